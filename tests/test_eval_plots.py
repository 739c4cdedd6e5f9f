"""The evaluation plots (mlx_persona.eval.plots), checked on the figures they build: a zero is visible, a missing
value is not drawn as one, and each model keeps one colour through every plot."""

from __future__ import annotations

from matplotlib.colors import same_color, to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Text

from mlx_persona.eval.metrics import reply_metrics
from mlx_persona.eval.plots import (
    MIN_VISIBLE,
    REFERENCE,
    REFERENCE_COLOUR,
    eval_figures,
    model_colours,
    png,
    rates_figure,
    sweep_figure,
)


def artists(fig, gid: str) -> list:
    """Every artist of `fig` drawn for `gid` (a model, or MODEL|metric)."""
    return [a for a in fig.findobj() if a.get_gid() == gid]


def colour_of(artist):
    return artist.get_facecolor() if isinstance(artist, Patch) else artist.get_color()


def test_a_zero_is_a_marker_and_a_label_and_a_missing_value_says_na():
    colours = model_colours(["ft"])
    fig = rates_figure({"ft": {"mid_sentence": 0.0, "early_end": None, "length_stop": 0.25, "breaking": 0.003}},
                       colours)
    zero = artists(fig, "ft|mid_sentence")
    bars = [a for a in zero if isinstance(a, Rectangle)]
    markers = [a for a in zero if isinstance(a, Line2D)]
    assert [b.get_width() for b in bars] == [0.0]  # the bar itself has no width ...
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [0.0] and markers[0].get_marker() == "D"
    assert not markers[0].get_clip_on()  # whole, not cut in half by the axis at 0
    assert same_color(markers[0].get_color(), colours["ft"])  # ... so a marker in the model's colour shows it
    assert [t.get_text() for t in zero if isinstance(t, Text)] == ["0%"]
    tiny = artists(fig, "ft|breaking")  # 0.3%: a sliver of a pixel, also marked
    assert 0.003 < MIN_VISIBLE and any(isinstance(a, Line2D) for a in tiny)
    missing = artists(fig, "ft|early_end")  # None: no bar (not a zero), the label says so
    assert [type(a) for a in missing] == [Text] and missing[0].get_text() == "n/a"
    quarter = artists(fig, "ft|length_stop")
    assert [a.get_width() for a in quarter if isinstance(a, Rectangle)] == [0.25]
    assert not [a for a in quarter if isinstance(a, Line2D)]  # visible as a bar: no marker
    assert [t.get_text() for t in quarter if isinstance(t, Text)] == ["25%"]
    assert png(fig).startswith(b"\x89PNG")


def _result_and_rows():
    names = ["base", "ft", "other"]
    rows = [{"model": n, "seed": 0, "text": t, "stop_reason": "end_token", "metrics": reply_metrics(t, "end_token")}
            for n in names for t in ("Hooray! We played.", "We went to the park and played all day.")]
    summaries = {n: {"mid_sentence": 0.0, "early_end": 0.5, "length_stop": 0.0, "with_catchphrase": 0.5,
                     "breaking": 0.0, "undecodable": 0.0, "distinct_2": 0.9, "rep_3": 0.0, "style": 0.4}
                 for n in names}
    result = {"models": summaries, "reference": dict(summaries["base"]), "options": {"early_tokens": 50}}
    return names, result, rows


def test_each_model_has_one_colour_in_every_plot():
    names, result, rows = _result_and_rows()
    figures = eval_figures(result, rows, reference_words=[3, 9, 12])
    colours = model_colours(names)
    assert len({colours[n] for n in names} | {REFERENCE_COLOUR}) == len(names) + 1  # all different
    for name in names + [REFERENCE]:
        want = to_rgba(colours[name])
        for file, fig in figures.items():
            drawn = [a for a in fig.findobj() if (a.get_gid() or "").split("|")[0] == name
                     and isinstance(a, (Patch, Line2D))]
            assert drawn, (file, name)
            if file == "lengths.png" and name == REFERENCE:  # the outline of the reference histogram
                assert all(same_color(a.get_edgecolor(), want) for a in drawn), (file, name)
            else:
                assert all(same_color(colour_of(a), want) for a in drawn), (file, name)
    assert model_colours(names) == colours and model_colours(names[:2]) == {
        k: v for k, v in colours.items() if k in names[:2] + [REFERENCE]}  # by position: the same every time


def test_sweep_bars_take_their_models_colour():
    rows = [{"model": m, "setting": s, "words_mean": 0.0 if s == "a" else 12.0, "words_min": 0, "words_max": 20,
             "early_end": 0.0, "mid_sentence": 0.5, "length_stop": None} for m in ("x", "y") for s in ("a", "b")]
    colours = model_colours(["x", "y"])
    fig = sweep_figure(rows, colours)
    for m in ("x", "y"):
        bars = [a for a in fig.findobj(Rectangle) if (a.get_gid() or "").startswith(f"{m}|")]
        assert len(bars) == 2 * 3 and all(same_color(b.get_facecolor(), colours[m]) for b in bars)
        # 0 words (setting a) and a 0% early end (a and b): marked; hit max_new_tokens unknown: n/a
        marked = [a.get_gid() for a in fig.findobj(Line2D) if (a.get_gid() or "").startswith(f"{m}|")]
        assert sorted(marked) == [f"{m}|early_end", f"{m}|early_end", f"{m}|words_mean"]
        assert [t.get_text() for t in fig.findobj(Text) if t.get_gid() == f"{m}|length_stop"] == ["n/a", "n/a"]


def test_colours_cycle_past_the_palette():
    nine = model_colours([f"m{i}" for i in range(9)])
    assert len(set(nine.values())) == 10  # nine models and the reference
    ten = model_colours([f"m{i}" for i in range(10)])
    assert ten["m9"] == ten["m0"]
