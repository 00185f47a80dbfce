"""The auto preset: the policy on its own (quality floor, load -> faster presets and back, errors), then through a
real server driven by the openai client (``<model>:auto`` and ``preset: auto`` report their choice, /metrics
counts it, the floor holds), and the CLI's checks of its options."""

from __future__ import annotations

import shutil

import httpx
import pytest
from openai import BadRequestError, OpenAI
from typer.testing import CliRunner

from serving.auto_preset import AutoConfig, AutoPreset, AutoPresetError, AutoPresetPolicy, Candidate, LatencyModel
from serving.presets import PresetError, load_presets_file
from tests.serving.conftest import start_server

# most faithful first: quality falls as speed rises; "junk" is the fastest but below the floor used below
CANDIDATES = [
    Candidate("faithful", -3.0, 1.0),
    Candidate("mid", -3.5, 0.5),
    Candidate("fast", -4.0, 0.2),
    Candidate("junk", -9.0, 0.1),
]

PRESETS_YAML = """\
default: faithful
presets:
  - {name: faithful, placement: "fa*4", measured_quality: -3.0, speedup: 1.0}
  - {name: mid, placement: "fa,gdn,fa,gdn", measured_quality: -3.5, speedup: 2.0}
  - {name: fast, placement: "gdn*4", measured_quality: -4.0, speedup: 5.0}
  - {name: junk, placement: "kda*4", measured_quality: -9.0, speedup: 10.0}
  - {name: unscored, placement: "swa*4"}
"""


def policy(target_ms: float = 100.0, floor: float | None = None) -> AutoPresetPolicy:
    return AutoPresetPolicy(CANDIDATES, AutoConfig(latency_target_ms=target_ms, min_quality=floor, smoothing=1.0))


def test_most_faithful_before_any_measurement():
    choice = policy().choose(load=50.0)
    assert choice.preset == "faithful" and choice.predicted_s is None


def test_load_moves_to_faster_presets_and_back():
    p = policy(target_ms=100.0, floor=-5.0)
    p.model.observe(0.040, load=1.0)  # 40 ms per token with one all-FA sequence running: w = 20 ms per unit
    assert p.model.predict(0.0) == pytest.approx(0.020)
    assert p.choose(load=0.0).preset == "faithful"  # 20 ms * (1 + 1.0) = 40 ms
    assert p.choose(load=3.4).preset == "mid"  # faithful: 20 * 5.4 = 108 ms > 100; mid: 20 * 4.9 = 98 ms
    loaded = p.choose(load=3.9)  # faithful 118 ms, mid 108 ms, fast 102 ms: none meets, the fastest above the floor
    assert (loaded.preset, loaded.meets_target) == ("fast", False)
    assert loaded.predicted_s == pytest.approx(0.102)
    assert p.choose(load=100.0).preset == "fast"  # never "junk": its quality is below the floor
    assert p.choose(load=0.5).preset == "faithful"  # the load dropped: back to the faithful preset


def test_measurements_steer_the_choice():
    p = policy(target_ms=100.0)
    p.model.observe(0.030, load=2.0)  # w = 10 ms
    assert p.choose(load=2.0).preset == "faithful"  # 10 * 4 = 40 ms
    p.model.observe(0.300, load=2.0)  # the machine got 10x slower (smoothing 1: the latest measurement rules)
    assert p.choose(load=2.0).preset == "junk"  # 100 * 3.1 = 310 ms: still over, the fastest (no floor)


def test_rows_count_in_the_prediction():
    p = policy(target_ms=100.0, floor=-5.0)
    p.model.observe(0.020, load=1.0)  # w = 10 ms
    assert p.choose(load=7.0, rows=1).preset == "faithful"  # 10 * 9 = 90 ms
    assert p.choose(load=7.0, rows=3).preset == "mid"  # faithful 10 * 11 = 110; mid 10 * (8 + 1.5) = 95
    assert p.choose(load=7.0, rows=6).preset == "fast"  # mid 10 * 11 = 110; fast 10 * 9.2 = 92


def test_moving_average():
    m = LatencyModel(shared=1.0, smoothing=0.5)
    m.observe(0.010, 0.0)
    m.observe(0.030, 0.0)
    assert m.w == pytest.approx(0.020)
    m.observe(float("nan"), 0.0)  # ignored
    assert m.predict(1.0) == pytest.approx(0.040)


def test_floor_above_every_preset_is_a_clear_error():
    with pytest.raises(AutoPresetError, match=r"--min-quality -2\.0: no preset reaches it .*'faithful'.*-3"):
        policy(floor=-2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency_target_ms": 0.0}, r"--latency-target-ms 0\.0: must be a number > 0"),
        ({"latency_target_ms": float("inf")}, r"--latency-target-ms inf"),
        ({"min_quality": float("nan")}, r"--min-quality nan: must be a finite number"),
        ({"smoothing": 0.0}, r"smoothing 0\.0"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(AutoPresetError, match=message):
        AutoConfig(**kwargs)


def test_presets_without_quality_cannot_be_auto():
    from serving.presets import builtin_presets

    with pytest.raises(AutoPresetError, match="needs presets with measured_quality and speedup.*builtin"):
        AutoPresetPolicy.from_presets(builtin_presets(4))


def test_auto_is_a_reserved_name(tmp_path):
    (tmp_path / "presets.yaml").write_text("presets:\n  - {name: auto, placement: 'fa*4'}\n")
    with pytest.raises(PresetError, match="'auto' is reserved"):
        load_presets_file(tmp_path / "presets.yaml", 4)


def test_candidates_from_presets_yaml(tmp_path):
    (tmp_path / "presets.yaml").write_text(PRESETS_YAML)
    table = load_presets_file(tmp_path / "presets.yaml", 4)
    auto = AutoPreset(AutoPresetPolicy.from_presets(table, AutoConfig(min_quality=-5.0)))
    assert [c.name for c in auto.policy.candidates] == ["faithful", "mid", "fast"]  # unscored/junk left out
    assert auto.policy.cost_of("fast") == pytest.approx(0.2) and auto.policy.cost_of("unscored") == 1.0


# ---- through a real server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with a presets.yaml that carries quality and speed, as the search writes them."""
    out = tmp_path_factory.mktemp("auto") / "tiny-scored"
    shutil.copytree(tiny_dir, out)
    (out / "presets.yaml").write_text(PRESETS_YAML)
    return out


@pytest.fixture(scope="module")
def auto_server(tiny_model, tiny_tokenizer, scored_dir):
    # a target no CPU meets: after the first measured request every choice is the fastest above the floor
    config = AutoConfig(latency_target_ms=0.001, min_quality=-5.0)
    yield from start_server(tiny_model, tiny_tokenizer, scored_dir, served_model_name="tiny", auto=config)


def test_auto_through_the_openai_client(auto_server):
    client = OpenAI(base_url=auto_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert "tiny:auto" in [m.id for m in client.models.list().data]
    messages = [{"role": "user", "content": "Call me Ishmael."}]
    first = client.chat.completions.create(model="tiny:auto", messages=messages, max_tokens=8, temperature=0)
    assert first.model == "tiny:faithful"  # nothing measured yet: the most faithful preset
    # the same greedy answer as asking for that preset by name
    named = client.chat.completions.create(model="tiny:faithful", messages=messages, max_tokens=8, temperature=0)
    assert first.choices[0].message.content == named.choices[0].message.content
    # measured now: no preset meets 1 us per token, so the fastest one within the floor ("junk" is below it)
    second = client.completions.create(
        model="tiny", prompt="To be, or not", max_tokens=8, temperature=0, extra_body={"preset": "auto"}
    )
    assert second.model == "tiny:fast"
    fast = client.completions.create(model="tiny:fast", prompt="To be, or not", max_tokens=8, temperature=0)
    assert second.choices[0].text == fast.choices[0].text
    chunks = list(
        client.chat.completions.create(model="tiny:auto", messages=messages, max_tokens=4, stream=True)
    )
    assert {c.model for c in chunks} == {"tiny:fast"}
    metrics = httpx.get(auto_server.url + "/metrics").text
    assert 'supernet_auto_preset_choices_total{preset="faithful"} 1.0' in metrics
    assert 'supernet_auto_preset_choices_total{preset="fast"} 2.0' in metrics
    assert 'supernet_auto_preset_choices_total{preset="mid"} 0.0' in metrics
    assert 'supernet_auto_preset_choices_total{preset="junk"}' not in metrics
    assert auto_server.app.state.settings.auto.tracker.rows == 0  # every stream released its load


def test_auto_refused_without_scored_presets(client):
    """The default test server serves the built-in presets, which carry no quality or speed."""
    with pytest.raises(BadRequestError, match="preset 'auto': the auto preset needs presets with measured_quality"):
        client.completions.create(model="tiny:auto", prompt="hi", max_tokens=2)
    assert "tiny:auto" not in [m.id for m in client.models.list().data]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-quality", "-1"], "--min-quality -1.0: no preset reaches it"),
        (["--min-quality", "nan"], "--min-quality nan: must be a finite number"),
        (["--latency-target-ms", "-5"], "--latency-target-ms -5.0: must be a number > 0"),
    ],
)
def test_cli_rejects_bad_auto_options(scored_dir, args, message):
    from supernet.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(scored_dir), "--port", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
