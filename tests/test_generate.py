"""Generation: reproducible with a seeded generator, greedy decoding equals the argmax of the full forward, CFG with
coefficient 1 equals no CFG, streaming hands over every frame once and in order, bad arguments raise."""

import copy

import pytest
import torch
from tolerances import assert_close_to_reference

from mmdkernels.patterns import PATTERNS
from models.generate import GraphedStep, generate
from models.lm import LMConfig, MusicLM, teacher_forcing

FRAME_RATE = 10  # frames per second in these tests: 0.5 s = 5 frames


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(pattern: str, dtype=torch.float64) -> MusicLM:
    torch.manual_seed(0)
    config = LMConfig(
        pattern=pattern, num_codebooks=3, codebook_size=23, dim=32, num_layers=2, num_heads=4, ffn_dim=48, text_dim=16
    )
    model = MusicLM(config).to(dtype).eval()
    with torch.no_grad():  # larger than the 0.02 init: sampling then depends on the context and the prompt
        model.heads.mul_(40)
        for layer in model.layers:
            layer.cross_attn.out.weight.mul_(40)
    return model


def run(model, prompts=("rock", None), seconds=0.5, **kwargs):
    return generate(model, list(prompts), seconds, frame_rate=FRAME_RATE, **kwargs)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_shapes_ranges_and_reproducibility(pattern):
    model = tiny_model(pattern, torch.float32)
    a = run(model, seconds=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    b = run(model, seconds=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    c = run(model, seconds=0.7, top_k=5, generator=torch.Generator().manual_seed(4))
    assert a.shape == (2, 3, 7) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 23
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cfg_coef", [None, 2.5])
def test_greedy_equals_argmax_of_the_full_forward(pattern, cfg_coef):
    model = tiny_model(pattern)
    prompts = ["piano", "drums", None]
    codes = run(model, prompts, temperature=0.0, cfg_coef=cfg_coef)
    inputs, targets, valid = teacher_forcing(codes, pattern, model.config.special)
    with torch.no_grad():
        logits = model(inputs, model.encode_condition(prompts))
        if cfg_coef is not None:
            null = model(inputs, model.encode_condition([None] * len(prompts)))
            logits = null + cfg_coef * (logits - null)
    assert torch.equal(logits.argmax(-1)[:, valid], targets[:, valid])


@pytest.mark.parametrize("pattern", ["delay", "flatten"])
def test_cfg_coefficient_one_equals_no_cfg(pattern):
    model = tiny_model(pattern)
    kwargs = dict(top_k=0, top_p=0.9, temperature=1.3)
    plain = run(model, cfg_coef=None, generator=torch.Generator().manual_seed(7), **kwargs)
    guided = run(model, cfg_coef=1.0, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(plain, guided)
    strong = run(model, cfg_coef=8.0, generator=torch.Generator().manual_seed(7), **kwargs)
    assert not torch.equal(plain, strong)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_streaming_gets_every_frame_once_in_order(pattern):
    model = tiny_model(pattern, torch.float32)
    chunks = []
    codes = run(model, seconds=0.9, generator=torch.Generator().manual_seed(0), on_frames=chunks.append)
    assert all(chunk.shape[:2] == (2, 3) and chunk.shape[2] >= 1 for chunk in chunks)
    assert torch.equal(torch.cat(chunks, dim=2), codes)
    assert len(chunks) == 9  # every pattern completes one frame at a time


def test_streamed_frames_are_final_when_handed_over():
    model = tiny_model("delay", torch.float32)
    chunks, steps_seen = [], []
    codes = run(
        model,
        seconds=0.6,
        generator=torch.Generator().manual_seed(1),
        on_frames=lambda frames: chunks.append((len(steps_seen) + 1, frames.clone())),
        on_step=steps_seen.append,
    )
    first = 0
    for steps_done, frames in chunks:  # delay: frames [0, t] are complete once t + K steps are done
        assert steps_done == first + frames.shape[2] + 3 - 1
        assert torch.equal(frames, codes[:, :, first : first + frames.shape[2]])
        first += frames.shape[2]
    assert first == 6


def position_of_step(pattern: str, num_codebooks: int, step: int, stream: int) -> tuple[int, int]:
    """(codebook, frame) that stream r of step s holds, written out from the patterns' definitions (not with
    mmdkernels.patterns): delay k = r, t = s - r; flatten k = s mod K, t = s div K; parallel k = r, t = s."""
    if pattern == "delay":
        return stream, step - stream
    if pattern == "flatten":
        return step % num_codebooks, step // num_codebooks
    return stream, step


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fed_tokens_follow_the_pattern_layout(pattern):
    """The tokens the model is fed at step s are the codes sampled at step s - 1, laid out as the pattern says
    (position_of_step), with the special token where that position holds no frame (delay's corners) and as the start
    token; no code is the special token."""
    model = tiny_model(pattern, torch.float32)
    fed, decode_step = [], model.decode_step

    def recording_step(tokens, step, *args):
        fed.append(tokens.clone())
        return decode_step(tokens, step, *args)

    model.decode_step = recording_step
    codes = run(model, seconds=0.3, generator=torch.Generator().manual_seed(2))
    batch, num_codebooks, num_frames = codes.shape
    special = model.config.special
    assert int(codes.max()) < special
    assert len(fed) == {"delay": num_frames + num_codebooks - 1, "flatten": num_frames * num_codebooks}.get(
        pattern, num_frames
    )
    for step, tokens in enumerate(fed):
        for stream in range(tokens.shape[1]):
            k, frame = position_of_step(pattern, num_codebooks, step - 1, stream)
            valid = step > 0 and 0 <= frame < num_frames
            expected = codes[:, k, frame] if valid else torch.full((batch,), special)
            assert torch.equal(tokens[:, stream], expected.repeat(tokens.shape[0] // batch)), (step, stream)  # CFG


def test_single_frame_single_prompt():
    model = tiny_model("delay", torch.float32)
    codes = run(model, ["x"], seconds=0.1, generator=torch.Generator().manual_seed(0), progress=True)
    assert codes.shape == (1, 3, 1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"conditions": []}, ValueError, "conditions must be a non-empty list"),
        ({"conditions": ["a", 3]}, TypeError, "conditions must hold str or None"),
        ({"seconds": 0}, ValueError, "seconds must be a positive number"),
        ({"seconds": 0.01}, ValueError, "at least one frame"),
        ({"pattern": "flatten"}, ValueError, "pattern must be None or the model's pattern 'delay'"),
        ({"frame_rate": -1}, ValueError, "frame_rate must be a positive number"),
        ({"generator": 5}, TypeError, "generator must be a torch.Generator"),
        ({"cfg_coef": "3"}, TypeError, "cfg_coef must be a float or None"),
        ({"cuda_graph": "yes"}, ValueError, "cuda_graph must be one of"),
        ({"cuda_graph": True}, ValueError, "cuda_graph=True needs the model on a CUDA device"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"top_k": -2}, ValueError, "top_k"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"model": torch.nn.Linear(2, 2)}, TypeError, "model must be a models.lm.MusicLM"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    args = {"model": tiny_model("delay", torch.float32), "conditions": ["a"], "seconds": 0.5} | kwargs
    args.setdefault("frame_rate", FRAME_RATE)
    with pytest.raises(error, match=match):
        generate(args.pop("model"), args.pop("conditions"), args.pop("seconds"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA graphs need one")
@pytest.mark.parametrize("pattern", ["delay", "flatten"])
def test_cuda_graph_step_equals_eager_step(pattern):
    model = tiny_model(pattern, torch.float32).cuda()
    model64 = copy.deepcopy(model).double()  # the same weights: the float64 reference
    condition = model.encode_condition(["a", None])
    codes = torch.randint(0, 23, (2, 3, 4), device="cuda")
    inputs, _, _ = teacher_forcing(codes, pattern, model.config.special)
    eager_cache = model.new_cache(condition, inputs.shape[2])
    graph_cache = model.new_cache(condition, inputs.shape[2])
    cache64 = model64.new_cache(model64.encode_condition(["a", None]), inputs.shape[2])
    graphed = GraphedStep(model, graph_cache, 2)
    with torch.inference_mode():
        for s in range(inputs.shape[2]):
            eager = model.decode_step(inputs[:, :, s], s, eager_cache)
            reference = model64.decode_step(inputs[:, :, s], s, cache64)
            # the graph replays the tensor-step path, eager takes the int-step one: the rule, eager as the baseline
            assert_close_to_reference(graphed(inputs[:, :, s], s), reference, eager, name=f"graphed step {s}")
    g = torch.Generator("cuda").manual_seed(0)
    a = generate(model, ["a"], 0.5, frame_rate=FRAME_RATE, cuda_graph=True, temperature=0.0)
    b = generate(model, ["a"], 0.5, frame_rate=FRAME_RATE, cuda_graph=False, temperature=0.0, generator=g)
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events")
@pytest.mark.parametrize("pattern, trace", [("delay", True), ("flatten", False)])
def test_profile_entry_point(pattern, trace, capsys, tmp_path):
    from models.generate import main

    argv = ["profile", "--pattern", pattern, "--seconds", "0.1", "--device", "cpu"]
    main(argv + (["--trace", str(tmp_path)] if trace else []))
    printed = capsys.readouterr().out
    for key in ("step_ms_mean", "step_ms_p50", "step_ms_p99", "ms_per_audio_second"):
        assert key in printed
    assert any(tmp_path.iterdir()) == trace  # the torch.profiler trace
