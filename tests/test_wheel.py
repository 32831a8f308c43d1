"""The package as a user installs it: a regular wheel (and an sdist that carries the C++ sources), installed into a
folder of its own and used from outside the checkout. CUDA is skipped for time; the CPU libraries are built."""

import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from subprocess_util import run

ROOT = Path(__file__).resolve().parents[1]

# Runs every public op once on the installed package, from a directory outside the checkout.
SMOKE = r"""
import os, sys, torch
import mmdkernels
from mmdkernels import metrics, patterns

assert os.path.realpath(mmdkernels.__file__).startswith(os.path.realpath(sys.argv[1])), mmdkernels.__file__
capability = mmdkernels.cpu_capability()
assert capability in ("avx512", "avx2", "default"), capability
g = torch.Generator().manual_seed(0)

q = torch.randn(3, 4, 8, 9, generator=g, requires_grad=True)
for estimator in ("shuffle", "dhsic"):
    for mode in ("joint", "pairwise"):
        fused = mmdkernels.mmd_loss(q, delay=True, mode=mode, estimator=estimator, backend="cpp",
                                    generator=torch.Generator().manual_seed(1))
        ref = mmdkernels.mmd_loss(q.double(), delay=True, mode=mode, estimator=estimator, backend="reference",
                                  generator=torch.Generator().manual_seed(1))
        assert abs(fused.item() - ref.item()) < 1e-3 * max(1.0, abs(ref.item())), (mode, estimator, fused, ref)
        fused.backward()
        assert torch.isfinite(q.grad).all()
        q.grad = None
mmdkernels.MMDLoss(delay=True)(q).backward()

codebooks = torch.randn(4, 64, 8, generator=g)
latents = torch.randn(2, 8, 11, generator=g)
codes, quantized = mmdkernels.rvq_encode(latents, codebooks, return_quantized=True, backend="cpp")
assert torch.equal(codes, mmdkernels.rvq_encode_ref(latents, codebooks))
decoded = mmdkernels.rvq_decode(codes, codebooks)
assert decoded.shape == latents.shape and quantized.shape == (2, 4, 8, 11)
vq = mmdkernels.ResidualVQ(dim=8, num_codebooks=4, codebook_size=64)
assert vq(latents).codes.shape == (2, 4, 11)

logits = torch.randn(4, 4, 100, generator=g)
uniforms = torch.rand(2, 4, generator=g, dtype=torch.float64)
tokens = mmdkernels.sample(logits, top_k=10, cfg_coef=3.0, uniforms=uniforms, backend="cpp")
assert torch.equal(tokens, mmdkernels.sample_ref(logits, top_k=10, cfg_coef=3.0, uniforms=uniforms))

query, k_cache, v_cache = torch.randn(2, 4, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
lengths = torch.tensor([3, 10])
out = mmdkernels.decode_attention(query, k_cache, v_cache, lengths, backend="cpp")
torch.testing.assert_close(out, mmdkernels.decode_attention_ref(query, k_cache, v_cache, lengths), atol=1e-4, rtol=1e-4)

x, weight = torch.randn(4, 32, generator=g), torch.randn(24, 32, generator=g)
torch.testing.assert_close(mmdkernels.decode_linear(x, weight, backend="cpp"), x @ weight.T, atol=1e-4, rtol=1e-4)

frames = torch.randint(0, 64, (2, 4, 7), generator=g)
assert torch.equal(patterns.revert_pattern(patterns.apply_pattern(frames, "delay", 64), "delay", 4, 7), frames)
assert metrics.pairwise_mutual_information(frames, 64).shape == (4, 4)
print("capability", capability)
"""


def _run(args, timeout=840, **kwargs):
    """Runs a command in its own process group (killed whole on timeout); fails the test on a non-zero exit."""
    result = run([str(a) for a in args], timeout, **kwargs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args[:4]))} failed:\n{output[-5000:]}"
    return output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, MMDKERNELS_SKIP_CUDA="1", MMDKERNELS_STRICT_BUILD="1", PIP_NO_INDEX="1")
    env.pop("MMDKERNELS_CPU_ARCH", None)
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(ROOT)],
         cwd=ROOT, env=env)
    (path,) = out.glob("mmdkernels-*.whl")
    return path


@pytest.mark.timeout(900)
def test_wheel_holds_the_library_and_no_models_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("models/")], "a top-level `models` package would collide"
    for subpackage in ("mmd", "rvq", "sampling", "attention"):
        assert f"mmdkernels/{subpackage}/__init__.py" in names
    libraries = {Path(n).name.split(".")[0] for n in names if n.endswith(".so")}
    expected = {"_C_avx512", "_C_avx2"} if os.uname().machine in ("x86_64", "AMD64") else {"_C_default"}
    assert libraries == expected, libraries


@pytest.mark.timeout(900)
@pytest.mark.parametrize("capability", [None, "avx2"])
def test_installed_wheel_runs_every_public_op_outside_the_checkout(wheel, tmp_path, capability):
    if capability and os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip(reason="the avx2 library exists on x86-64 only")
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    assert not (site / "models").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMDKERNELS_")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    if capability:
        env["MMDKERNELS_CPU_CAPABILITY"] = capability
    output = _run([sys.executable, "-W", "error::RuntimeWarning", "-c", SMOKE, str(site)], cwd=work, env=env,
                  timeout=300)
    if capability:
        assert f"capability {capability}" in output


@pytest.mark.timeout(300)
def test_sdist_carries_the_sources_it_builds_from(tmp_path):
    _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT,
         env=dict(os.environ, MMDKERNELS_NO_EXTENSIONS="1"))
    (sdist,) = tmp_path.glob("mmdkernels-*.tar.gz")
    names = {"/".join(n.split("/")[1:]) for n in tarfile.open(sdist).getnames()}
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu")]
    missing = sorted(set(sources) - names)
    assert not missing, f"sdist lacks {missing}"
    assert {"setup.py", "pyproject.toml", "README.md"} <= names
    assert not [n for n in names if n.startswith("models/")]
