"""Per-layer statistics recorded while training, and the file they are saved in.

Record with `ActivationStats` (a Learner callback); read back with `load_stats(path_or_run_dir)`.

The saved format, `stats.npz` (numpy, no pickles), format_version 1. T rows (recorded steps, older ones
possibly merged), M watched modules, P modules owning parameters, B histogram bins:

    format_version   ()        int, 1; another version is refused with a DataError
    modules          (M,)      str, module names as in model.named_modules()
    steps            (T,)      int64, training step of each row (of the row's last step when merged)
    weights          (T,)      int64, recorded steps merged into the row (1 for full-resolution rows)
    act_mean, act_std, act_min, act_max   (T, M) float32, over the summarised values of the module output
                     (below), std unbiased; NaN where the module did not run
    act_dead         (T, M)    float32, fraction of those values with |a| <= dead_threshold
    act_nonfinite    (T, M)    float32, count of NaN / inf among them
    act_hist         (T, M, B) float32, counts of |a| per bin; finite values beyond hist_edges are clamped
                     into the end bins, NaN/inf are left out (they are counted in act_nonfinite)
    hist_edges       (B+1,)    float64
    grad_mean, grad_std, grad_norm, grad_nonfinite   (T, M) float32, of the gradient of each module's
                     output; NaN where the module got no gradient at that step. grad_norm estimates the
                     whole gradient's norm, sqrt(N / n) times the norm of the n summarised of its N values
    param_modules    (P,)      str, modules that own trainable parameters directly (all of the model's)
    weight_norm, param_grad_norm, update_ratio   (T, P) float32: L2 norms over the module's own
                     parameters before the update (the weights the step ran with), of their gradients, and
                     ||w_after - w_before|| / ||w_before||; never sampled

Summarised values: by default (`ActivationStats(subsample=4096)`) 4096 values of each output and gradient
per step, the whole tensor when it has no more (then the statistics are exact), else a systematic sample in
runs of 8 along a prime-step lattice from a random start (`sample.py`); with `subsample=None`, every value.
Counts (act_hist, act_nonfinite, grad_nonfinite) are counts among the summarised values.
    dead_threshold   ()        float
    valid_steps, valid_weights, valid_act_*   only when validation statistics were collected
                     (ActivationStats(valid=True)); one row per recorded validation batch, `valid_steps`
                     being the training step at which that validation ran. In `Stats` they are the dict
                     `Stats.valid`, keyed by these names.

Merged rows (older than the last `recent`): mean, dead fraction, norms and ratios are weighted means
(weights = `weights`), std is the pooled std, min/max of the members, histograms and non-finite counts
are sums.
"""
from .callback import ActivationStats
from .engine import DEAD_THRESHOLD, StatsRecorder
from .format import FORMAT_VERSION, Stats, load_stats, save_stats
from .store import HistoryStore

__all__ = ["DEAD_THRESHOLD", "ActivationStats", "StatsRecorder", "FORMAT_VERSION", "Stats", "load_stats", "save_stats", "HistoryStore"]
