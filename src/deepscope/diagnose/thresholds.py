"""Every number diagnosis compares against, each with the reason it has that value.

Change one here and the tests in tests/test_diagnose_analyse.py show what it moves.
"""

# --- the instrumented run ------------------------------------------------------------------------------
# A few dozen steps: enough for the loss to move, for a dead unit to stay dead and for a too-high learning
# rate to diverge, and still about a second on a CPU for a small model.
DEFAULT_STEPS = 30
# `deepscope doctor` runs longer: lesson 10's plain CNN at lr 0.6 diverges around step 42, and the checks
# for a loss stuck at chance need 100 steps (NOT_LEARNING_MIN_STEPS); about 15 s for the default CNN.
DOCTOR_STEPS = 100

# --- dead units (what "off" and "dead" mean is deepscope.dead's, one definition for everything) ----------
# 40% of a layer's units dead is lost capacity worth a warning. Healthy ReLU layers lose fewer: at most 28%
# (median 12%) in a 3-layer MLP at torch's default init over 12 seeds, under 10% in the default CNN without
# norm layers, none with BatchNorm. All of them dead is an error.
DEAD_LAYER_FRACTION = 0.4

# --- activation scale (lesson 10-11 of the fast.ai course: "the std should stay near 1 through depth") ---
# A layer whose output std is 100x the input's: the signal grows geometrically with depth (weights too
# large for their fan-in), and float overflow or huge gradients follow a few layers later.
ACT_EXPLOSION_RATIO = 100.0
# A hidden layer whose output std is 1/100 of the input's: the signal vanishes with depth, and so do the
# gradients that flow back through it (torch's default init shrinks std ~0.4x per ReLU layer).
ACT_COLLAPSE_RATIO = 0.01
# The same factor over time: a layer's output std growing or shrinking 100x during the short run means
# training itself is blowing up or switching the layer off.
ACT_DRIFT_RATIO = 100.0

# --- saturation (what counts as saturated is deepscope.dead.SATURATION_MARGIN) ---------------------------
# Flag when this share of a layer's outputs sits at the limits; with inputs of std 1 a tanh puts under 1%
# there, so 40% means the pre-activations are far too large.
SATURATED_FRACTION = 0.4

# --- the loss head -------------------------------------------------------------------------------------
# Rows that sum to 1 within this (and are >= 0) are probabilities; float32 softmax rows sum to 1 within
# ~1e-6, while raw logits essentially never do.
PROBABILITY_TOLERANCE = 1e-4

# --- learning rate -------------------------------------------------------------------------------------
# Mean loss of the last quarter of the run vs the first quarter. A rise of 20% in the first few dozen
# steps is not noise for a model that should be learning: the steps overshoot.
LOSS_RISE_WARNING = 1.2
# Doubling (or becoming NaN after rising) is divergence; so is any single recorded loss above twice the
# first one, even if the run recovers afterwards (a spike of a too-large step).
LOSS_RISE_ERROR = 2.0
# The loss counts as flat when the two quarters differ by less than 5%: batch-to-batch noise of the loss
# on small batches is a few percent, so a smaller change cannot be told from no change.
LOSS_FLAT_CHANGE = 0.05
# Update-to-weight ratio ||dW|| / ||W|| per step: the rule of thumb (Karpathy, CS231n) is ~1e-3; ten
# times below it with a flat loss means the learning rate is too small to move the weights.
LR_LOW_UPDATE_RATIO = 1e-4
# The learning-rate checks need a curve: at least this many recorded losses...
LR_MIN_POINTS = 8
# ...and they look only at the first this many, so the annealed end of a long schedule is not "too low".
LR_WINDOW = 40

# --- batch norm ----------------------------------------------------------------------------------------
# Batch statistics from fewer than 8 samples are noisy enough to hurt accuracy (Wu & He 2018, Group
# Normalization, Fig. 1: BN's error rises steeply below 8 images per batch). 1 sample is an error:
# its variance is 0 (BatchNorm1d raises; BatchNorm2d normalises each image with its own statistics).
BN_SMALL_BATCH = 8

# --- inputs --------------------------------------------------------------------------------------------
# Inputs should be roughly mean 0, std 1 (LeCun et al. 1998, "Efficient BackProp", section 4.3). A mean
# beyond +-1 shifts every first-layer pre-activation; a std outside [0.2, 5] scales the whole forward pass
# (raw 0-255 pixels have std ~80). Images scaled to [0, 1] (std ~0.3) pass.
INPUT_MEAN_LIMIT = 1.0
INPUT_STD_MIN = 0.2
INPUT_STD_MAX = 5.0

# --- the whole run's history (ActivationStats and Recorder, read by the Diagnose callback) ----------------
# "The end of the run" is its last 10% of recorded rows (losses), at least this many, so one noisy step
# cannot decide a finding on its own.
HISTORY_TAIL_MIN = 5
# Fewer recorded rows (losses) than this are too short a history to call anything a trend.
HISTORY_MIN_POINTS = 8
# Rise-and-crash (lesson 10's plain CNN at a high learning rate): a layer whose output std ends below 1/10
# of its peak has been switched off by the training; in that run the ReLU layers peak at ~1.4 and end at
# 0.02-0.05 (27-68x down), while healthy runs end within 3x of their peak.
ACT_CRASH_RATIO = 0.1
# ...and below this absolute std: the target scale is ~1 (lesson 10-11), so a layer ending at 0.1 or less
# carries (and passes back) a tenth of a healthy signal; a layer that settles from 50 to 4 is not dead.
ACT_CRASH_FLOOR = 0.1
# Share of a layer's output values that are (near) zero at the end of the run. ReLU outputs are ~50% zero
# by nature: 0.44-0.56 in the healthy CNN runs with BatchNorm (default and kaiming init); the plain CNN that
# died at lr 0.6 ends at 0.82-0.86. Above 75% most of the layer passes no gradient; at 99% it is all off.
DEAD_VALUES_WARNING = 0.75
DEAD_VALUES_ERROR = 0.99
# A single training loss above 1.5x the first one is a spike: the first loss of a classifier is ~ln(C),
# chance level, so above 1.5x the model is confidently wrong: a step overshot. 2x is LOSS_RISE_ERROR.
LOSS_SPIKE_RATIO = 1.5
# ...and the rise must stand out of the batch-to-batch noise: above this many times the median change
# between consecutive losses. A regression on batches of 32 swings 2x between batches while it trains well
# (median change ~25% of the loss); a diverging step rises 100x more than its neighbours.
SPIKE_NOISE_MULTIPLE = 10.0
# The loss "ends at chance" when the end of the run is no lower than ln(n_classes) minus 3%: the batch
# noise of a loss that has stopped moving is ~1% at batch size 1024 and a few % on small batches.
CHANCE_TOLERANCE = 0.03
# ...after having been at least 5% below chance (averaged over this many consecutive losses): the model
# had learned something and lost it, which is divergence, not a learning rate too low to start.
CHANCE_LEARNED_MARGIN = 0.05
CHANCE_SMOOTH = 5
# ...judged only on runs of at least this many losses: in a 30-step run on batches of 4, the mean of 5
# noisy losses of a model that has not learned yet dips 5% below chance by chance alone.
CHANCE_RETURN_MIN_STEPS = 50

# not_learning: judged only after this many finite training losses. The default CNN's loss is 20 % below
# chance within ~20 steps at lr 1e-2, and a learning rate 10-30x lower still moves it by then; a model
# whose loss has not moved after 100 steps is stuck, not slow.
NOT_LEARNING_MIN_STEPS = 100
# ...for a loss with no known chance level: stuck when the last quarter's mean is within 2 % of the first
# steps' mean (batch noise of a flat loss is a few percent; any learning run moves it far more).
NOT_LEARNING_DROP = 0.02

# gradients_not_zeroed: judged after this many updates (the first backward after an update is checked at
# each), and reported when at least this share of them found the previous gradients still there. A loop
# that clears its gradients finds none; one that never does finds them at every update but the first.
LOOP_MIN_UPDATES = 3
STALE_GRADIENT_SHARE = 0.5

# gradient_explosion: a module's parameter-gradient norm whose median over the last quarter of the run is
# at least this many times its median over the first tenth. Healthy runs keep gradient norms within a
# factor of ~10 of where they started (they usually fall); three orders of magnitude is an explosion.
GRAD_EXPLOSION_RATIO = 1e3
# ...and where it starts: the module whose norm first passed this multiple of its early level.
GRAD_EXPLOSION_ONSET = 10.0
# ...and ending at a norm of at least this: an explosion makes gradients that throw the weights around. A
# collapsed network's gradients of 1e-11 that grow back to 1e-7 as training rescales it are not one.
GRAD_EXPLOSION_FLOOR = 1e-2

# unshuffled_batches (class targets given to `w.step(targets=)` or the Learner's batches): judged after this
# many batches. A shuffled batch of 32 from 10 classes holds a median 9-10 of them, and one of 16 from two
# balanced classes holds both in all but 1 batch in 30,000; 20 batches make a median of 1-2 classes (or a
# steady rise of the mean label) far too unlikely to come from shuffled data.
UNSHUFFLED_MIN_BATCHES = 20
# Batches holding a median of at most this many classes are "one or two classes each" (the brief for the
# check, and a few-way episode of meta-learning, which holds more, is left alone)...
UNSHUFFLED_BATCH_CLASSES = 2
# ...while shuffled batches of the same size would hold at least 1.75x as many (the expected number of
# distinct classes in a random batch, from the run's class frequencies). For two classes this means a
# shuffled batch holds just one of them at most a quarter of the time, so a median of 1 is not chance;
# small batches (2 images from 10 classes hold ~1.9 by nature) and rare classes do not reach it.
UNSHUFFLED_CLASS_RATIO = 1.75
# ...and with fewer than this many classes in the run, the labels must also arrive in order (see below):
# a binary task whose batches come one group at a time (a user, a domain) in random order is left alone.
UNSHUFFLED_MANY_CLASSES = 4
# The mean label of consecutive batches moves the same way (up, or down) at least 90% of the times it
# changes; drops of half the whole range or more are an epoch starting over and are not counted. Shuffled
# batches move up or down about equally often: 90% of 19 or more changes has a chance under 1e-4.
UNSHUFFLED_ORDER_SHARE = 0.9
# Sorted order alone (batches that hold several classes each, e.g. 100 classes in batches of 32) needs
# this many changes of the mean label to be judged.
UNSHUFFLED_MIN_CHANGES = 19
# A reversal of the mean label by half its whole range or more is an epoch of sorted data starting over
# when it happens at most once per 8 batches (an epoch of 8 batches or more); more often (batches of one
# class in random order) reversals are counted against the order.
UNSHUFFLED_EPOCH_BATCHES = 8
