"""What a notebook shows: concise text and HTML for Stats, findings, the analysis, LR-finder results and
the training loop, each once."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deepscope
from deepscope.diagnose import Finding, diagnose_run
from deepscope.diagnose.finding import Findings, sort_findings
from deepscope.lr_find import LRFindResult
from test_diagnose_fixtures import healthy_mlp, make_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def recorded_stats():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with deepscope.watch(model, opt) as w:
        for x, y in make_batches():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
    return w.stats()


def test_stats_repr_is_one_line_and_its_html_a_table_of_last_values():
    stats = recorded_stats()
    text = repr(stats)
    assert "\n" not in text and "3 modules" in text and "array" not in text and len(text) < 120
    page = stats._repr_html_()
    assert page.count("<tr>") == 1 + 3 and "off fraction" in page
    assert f"{stats.last()['1']['std']:.3g}" in page


def test_findings_show_as_cards_causes_first_and_print_as_text():
    found = sort_findings([Finding("dead_units", "act<1>", "warning", "dead & gone", "use <kaiming>"),
                           Finding("lr_too_high", "", "error", "the loss spiked", "lower it")])
    assert isinstance(found, Findings) and found == list(found)
    page = found._repr_html_()
    assert page.index("lr_too_high") < page.index("dead_units")            # the cause first
    assert "act&lt;1&gt;" in page and "dead &amp; gone" in page             # escaped
    assert "caused by lr_too_high" in page and "use &lt;kaiming&gt;" not in page  # a symptom's fix is its cause's
    assert str(found).startswith("2 findings")
    assert "No findings" in Findings()._repr_html_()


def test_the_analysis_shows_its_findings_and_what_was_checked():
    analysis = diagnose_run(healthy_mlp(), make_batches())
    page = analysis._repr_html_()
    assert "No findings" in page and "checks on 30 steps" in page


def test_lr_finder_result_shows_its_suggestions_and_curve():
    lrs = [10 ** (-5 + i / 10) for i in range(50)]
    losses = [2.3 - 0.03 * i if i < 40 else 1.1 + 0.5 * (i - 40) for i in range(50)]
    result = LRFindResult.from_curve(lrs, losses, losses, num_it=50)
    page = result._repr_html_()
    assert "learning-rate finder" in page and "data:image/png;base64," in page
    assert all(name in page for name in result.suggestions)


def test_training_loop_shows_once_in_a_notebook(monkeypatch, capsys):
    from deepscope.callbacks import progress

    learn = deepscope.Learner(healthy_mlp(), deepscope.data.DataLoaders(make_batches(), None))
    text = learn.show_training_loop()
    assert "before_fit" in capsys.readouterr().out  # a script prints it
    assert repr(text) == str(text) and "\\n" not in repr(text)  # shown as it is, not as an escaped string
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    learn.show_training_loop()
    assert capsys.readouterr().out == ""  # a notebook shows the returned value once
