"""Cost estimation: evaluations counted by running the samplers equal the network forwards the pipeline
makes; calibration and the table's arithmetic against an injected fake clock; the command."""

import pytest

from reverie import Pipeline
from reverie.cli import main, model_path
from reverie.cost import (
    Calibration,
    calibrate,
    check,
    count_evaluations,
    ddpm_samplers,
    parse_list,
    table,
)


@pytest.fixture(scope="module")
def shapes():
    return Pipeline.from_pretrained(model_path("shapes"))


def forwards(pipe, **kwargs) -> int:
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        pipe("a red circle", progress=False, seed=0, **kwargs)
    finally:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize("sampler", ddpm_samplers())
def test_counted_evaluations_are_the_network_forwards(shapes, sampler):
    for steps in (1, 2, 5):
        counted = count_evaluations(sampler, steps, shapes.schedule)
        assert counted == forwards(shapes, steps=steps, sampler=sampler)  # guidance on: cond+uncond in one
        assert counted == forwards(shapes, steps=steps, sampler=sampler, guidance_scale=1.0)
        # second-order samplers spend 2 a step, except the last step to sigma = 0 (Euler)
        assert counted == (2 * steps - 1 if sampler in ("heun", "dpmpp_sde") else steps)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fake_costs(pipe, clock, per_forward=0.1, text=0.25, decode=0.05):
    """Hooks that advance the fake clock: per network forward, per text encoding, per VAE decode."""
    def advance(seconds):
        def hook(*_):
            clock.now += seconds
        return hook

    return [pipe.unet.register_forward_pre_hook(advance(per_forward)),
            pipe.text_encoder.text_model.register_forward_pre_hook(advance(text)),
            pipe.vae.decoder.register_forward_pre_hook(advance(decode))]


def test_calibration_and_table_against_a_fake_clock(shapes):
    clock = FakeClock()
    hooks = fake_costs(shapes, clock)
    try:
        cal = calibrate(shapes, batch_size=2, steps=(2, 6), repeats=2, clock=clock)
        predicted, measured = check(shapes, cal, shapes.schedule, "heun", 7, clock=clock)
    finally:
        for h in hooks:
            h.remove()
    assert cal.eval_s == pytest.approx(0.1) and cal.fixed_s == pytest.approx(0.3)
    assert cal.batch_size == 2 and "2 and 6 steps" in cal.how
    assert predicted == pytest.approx(measured) == pytest.approx(0.3 + 13 * 0.1)  # heun, 7 steps: 13 forwards
    rows = table(cal, shapes.schedule, ["euler", "heun"], [10, 20], price_per_hour=3.0)
    by = {(r["sampler"], r["steps"]): r for r in rows}
    heun = by["heun", 10]
    assert heun["evaluations"] == 19
    assert heun["latency_s"] == pytest.approx(0.3 + 1.9) and heun["image_s"] == pytest.approx(2.2 / 2)
    assert heun["images_per_hour"] == pytest.approx(3600 * 2 / 2.2)
    assert heun["cost_per_1000"] == pytest.approx(3.0 * 1000 * 2.2 / 7200)
    assert by["euler", 20]["latency_s"] == pytest.approx(2.3)
    assert table(cal, shapes.schedule, ["euler"], [10])[0]["cost_per_1000"] is None  # no price, no cost


def test_calibration_validation(tmp_path):
    with pytest.raises(ValueError, match="eval_s"):
        Calibration("m", eval_s=-1.0, fixed_s=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        Calibration("m", eval_s=0.1, fixed_s=0.1, batch_size=0)
    with pytest.raises(ValueError, match="price_per_hour"):
        table(Calibration("m", 0.1, 0.1), None, ["euler"], [5], price_per_hour=-2)
    with pytest.raises(ValueError, match="--steps"):
        parse_list("5,ten", "--steps", int)
    cal = Calibration("H100", 0.01, 0.1, 4, model="shapes", how="measured there")
    cal.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == cal
    (tmp_path / "bad.json").write_text('{"machine": "x", "eval_s": 0.1, "fixed_s": 0.1, "gpus": 8}')
    with pytest.raises(ValueError, match="'gpus'"):
        Calibration.load(tmp_path / "bad.json")


def test_cost_command(capsys, tmp_path):
    assert main(["cost", "--gpu", "H100", "--eval-ms", "10", "--fixed-ms", "100", "--price-per-hour", "3",
                 "--samplers", "heun,euler", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "machine: H100" in out and "given" in out
    heun = next(line.split() for line in out.splitlines() if line.startswith("heun"))
    assert heun[:3] == ["heun", "10", "19"]
    assert float(heun[3]) == pytest.approx(0.29, abs=1e-4)  # 0.1 + 19 * 0.01 s
    assert float(heun[4]) == pytest.approx(3600 / 0.29, abs=1)
    assert float(heun[5]) == pytest.approx(3 * 1000 * 0.29 / 3600, abs=1e-4)
    # measured here, saved, and read back as another machine's figures
    assert main(["cost", "--samplers", "euler", "--steps", "5", "--repeats", "1", "--no-check",
                 "--save", str(tmp_path / "here.json")]) == 0
    assert "measured: euler at 2 and 10 steps" in capsys.readouterr().out
    assert main(["cost", "--calibration", str(tmp_path / "here.json"), "--samplers", "dpmpp_sde", "--steps", "5"]) == 0
    assert "dpmpp_sde" in capsys.readouterr().out
    for argv, field in [(["--gpu", "H100", "--eval-ms", "10"], "--fixed-ms"), (["--samplers", "nope"], "sampler"),
                        (["--steps", "5,x", "--gpu", "A", "--eval-ms", "1", "--fixed-ms", "1"], "--steps")]:
        assert main(["cost", *argv]) == 2
        assert field in capsys.readouterr().err


def test_flow_models_count_their_evaluations_and_calibrate(tmp_path):
    """cost works for flow models: evaluations of the flow samplers (Heun: 2 per step but the last), calibration
    hooks the transformer, and the default table lists the flow-capable samplers only."""
    pytest.importorskip("diffusers")
    from tiny_families import sd3_folder

    from reverie import cost
    from reverie.flow import FlowSchedule

    schedule = FlowSchedule(shift=3.0)
    assert cost.count_evaluations("euler", 10, schedule) == 10
    assert cost.count_evaluations("heun", 10, schedule) == 19
    assert cost.count_evaluations("DPM++ 2M", 10, schedule) == 10
    with pytest.raises(ValueError, match="ddim"):
        cost.count_evaluations("ddim", 10, schedule)
    folder = sd3_folder(tmp_path / "sd3")
    assert isinstance(cost.schedule_of(folder), FlowSchedule)
    calibration = cost.calibrate(Pipeline.from_pretrained(folder), steps=(1, 2), repeats=1, width=32, height=32)
    rows = cost.table(calibration, cost.schedule_of(folder), steps=[4])
    assert {r["sampler"] for r in rows} >= {"euler_flow", "heun_flow", "dpmpp_2m"} and "ddim" not in {r["sampler"]
                                                                                                        for r in rows}
