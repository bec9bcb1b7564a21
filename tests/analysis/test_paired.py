"""The paired test of a run against the base model (peftlab/analysis/paired.py)."""
from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from peftlab.analysis.paired import PairedError, compare, holm, mcnemar_p, paired_main, paired_table


@pytest.mark.parametrize("wins,losses", [(0, 0), (3, 0), (12, 5), (40, 41), (7, 30)])
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(wins, losses):
    expected = 1.0 if wins + losses == 0 else binomtest(wins, wins + losses, 0.5).pvalue
    assert mcnemar_p(wins, losses) == pytest.approx(expected, rel=1e-9)


def test_compare_counts_discordant_examples_and_brackets_the_difference():
    labels = [1, 0] * 50
    base = list(labels)
    base[:20] = [1 - y for y in labels[:20]]       # base wrong on the first 20
    run = list(labels)
    run[15:20] = base[15:20]                       # run wrong on 15..19 (the base too)
    run[50:53] = [1 - y for y in labels[50:53]]    # and on 50..52 (the base right)
    r = compare(base, run, labels)
    assert (r.n, r.wins, r.losses) == (100, 15, 3)
    assert (r.base, r.accuracy, r.delta) == pytest.approx((0.80, 0.92, 0.12))
    assert r.low < 0.12 < r.high and r.low > 0  # significant: 15 wins vs 3 losses
    assert r.p == pytest.approx(binomtest(3, 18, 0.5).pvalue)


def write_run(folder, method, before, after, labels):
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({"method": {"name": method}}))
    data = {"format": "peftlab-predictions-v1", "references": {"test": labels}, "after": {"test": after}}
    if before is not None:
        data["before"] = {"test": before}
    (folder / "predictions.json").write_text(json.dumps(data))
    return folder


def test_base_comes_from_the_base_run_and_bad_input_is_one_line(tmp_path, capsys):
    labels = [0, 1, 1, 0, 1, 0]
    base = write_run(tmp_path / "base", "lora", [0, 0, 0, 0, 0, 0], labels, labels)
    other = write_run(tmp_path / "dora", "dora", None, [0, 1, 1, 0, 0, 0], labels)
    rows = paired_table([other], base=base)
    assert (rows[0].method, rows[0].base, rows[0].wins, rows[0].losses) == ("dora", 0.5, 2, 0)
    with pytest.raises(PairedError, match="no base predictions"):
        paired_table([other])                      # its own 'before' is missing
    elsewhere = write_run(tmp_path / "elsewhere", "lora", [0] * 5, [0] * 5, [0, 1, 0, 1, 0])
    assert paired_main([str(elsewhere), "--base", str(base)]) == 2
    assert capsys.readouterr().err.strip().endswith("/base's (not the same examples)")
    assert paired_main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predictions.json: missing" in err[0]
    assert paired_main([str(other), "--base", str(base)]) == 0
    assert "| dora | dora | 6 | 0.500 | 0.833 | +0.333 |" in capsys.readouterr().out


def test_against_compares_trained_runs_one_reference_or_same_named_folders(tmp_path, capsys):
    labels = [0, 1, 1, 0, 1, 0]
    (tmp_path / "cls").mkdir(), (tmp_path / "mean").mkdir()
    cls_lora = write_run(tmp_path / "cls" / "lora", "lora", [1] * 6, [0, 1, 1, 0, 0, 1], labels)   # 4 right
    write_run(tmp_path / "cls" / "prompt", "prompt", [1] * 6, [0] * 6, labels)                      # 3 right
    mean_lora = write_run(tmp_path / "mean" / "lora", "lora", None, [0, 1, 1, 0, 1, 1], labels)      # 5 right
    mean_prompt = write_run(tmp_path / "mean" / "prompt", "prompt", None, [0, 1, 1, 0, 1, 0], labels)  # 6 right
    rows = paired_table([mean_lora, mean_prompt], against=tmp_path / "cls")  # each meets its namesake's 'after'
    assert [(r.method, r.base, r.accuracy, r.wins, r.losses) for r in rows] == [
        ("lora", pytest.approx(4 / 6), pytest.approx(5 / 6), 1, 0), ("prompt", 0.5, 1.0, 3, 0)]
    one = paired_table([mean_lora, mean_prompt], against=cls_lora)  # one run as the reference for all
    assert [(r.wins, r.losses) for r in one] == [(1, 0), (2, 0)]
    assert paired_main([str(mean_lora), "--against", str(tmp_path / "cls"), "--format", "md"]) == 0
    assert "| run | method | n | against | accuracy |" in capsys.readouterr().out
    with pytest.raises(PairedError, match="exclude each other"):
        paired_table([mean_lora], base=cls_lora, against=cls_lora)
    stray = write_run(tmp_path / "mean" / "dora", "dora", None, [0] * 6, labels)
    with pytest.raises(PairedError, match=r"cls/dora/predictions\.json: missing"):
        paired_table([stray], against=tmp_path / "cls")


def test_holm_adjusts_step_down_and_stays_monotone():
    # Holm by hand: sorted 0.01, 0.02, 0.04, 0.30 times 4, 3, 2, 1 -> 0.04, 0.06, 0.08, 0.30 (monotone)
    assert holm([0.04, 0.30, 0.01, 0.02]) == pytest.approx([0.08, 0.30, 0.04, 0.06])
    assert holm([0.5, 0.5]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.03, 0.02]) == pytest.approx([0.04, 0.04])  # the larger one never drops below the smaller


def test_runs_of_different_tasks_are_separate_holm_families(tmp_path, capsys):
    """Holm adjusts within a task: adding a run of another task leaves a task's adjusted p alone."""
    labels = [i % 2 for i in range(40)]
    wrong = [1 - y for y in labels]

    def run(name, task, right):
        folder = write_run(tmp_path / name, "lora", wrong, labels[:right] + wrong[right:], labels)
        result = json.loads((folder / "result.json").read_text())
        (folder / "result.json").write_text(json.dumps({**result, "task": {"name": task}}))
        return folder

    a1, a2, b1 = run("a1", "sentiment", 30), run("a2", "sentiment", 12), run("b1", "boolq", 25)
    alone = {r.run: r.p_holm for r in paired_table([a1, a2])}
    mixed = paired_table([a1, a2, b1])
    assert {r.run: r.p_holm for r in mixed if r.task == "sentiment"} == alone
    assert [r.task for r in mixed] == ["sentiment", "sentiment", "boolq"]
    b_alone = paired_table([b1])[0]
    assert mixed[2].p_holm == b_alone.p_holm == b_alone.p  # a family of one: unadjusted
    assert paired_main([str(a1), str(b1)]) == 0
    out = capsys.readouterr().out
    assert "| task |" in out and out.rstrip().endswith("| boolq |")
