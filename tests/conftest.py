import os
import tempfile

# No hub access anywhere in the test-suite: everything is built from configs or shipped.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="vtoken-hf-"))
import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels are checked through the interpreter; it must be set before any @triton.jit runs (a
# GPU compiles them: the interpreter there fails on device tensors).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so a CI failure can be reproduced; explore new examples with
# `pytest --hypothesis-profile=explore` (or --hypothesis-seed=N).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")

# One torch thread per pytest-xdist worker: the workers already fill the cores, and OpenMP threads that outnumber
# them spin while they wait (two 2-thread workers on 2 cores ran a file 3.7x slower than two 1-thread workers). The
# commands a test starts as subprocesses inherit the same.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook; pytest without the plugin (the GPU image's) skips it
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: xdist's own count of the cores, at most 8: each worker imports torch and builds its own models, so
    memory grows with their number. A count set in PYTEST_XDIST_AUTO_NUM_WORKERS is taken as it is."""
    from xdist.plugin import pytest_xdist_auto_num_workers as xdist_count

    count = xdist_count(config)
    return count if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") else min(8, count)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _only_hosts_a_method_runs_on(request):
    """A test parametrized over method variants (``name``) and a VLM host (a fixture ``host`` or ``*_host``) skips the
    hosts its method does not run on (VisionZip has no LLaVA-NeXT bridge), as the registry says."""
    callspec = getattr(request.node, "callspec", None)
    fixture = next((f for f in request.fixturenames if f == "host" or f.endswith("_host")), None)
    if callspec is None or "name" not in callspec.params or fixture is None:
        return
    import vtoken

    host = getattr(request.getfixturevalue(fixture), "name", None)
    method = callspec.params["name"]
    while method not in vtoken.methods() and "_" in method:  # a variant's name: the method's, then "_what_differs"
        method = method.rsplit("_", 1)[0]
    if host in vtoken.hosts() and method in vtoken.methods() and host not in vtoken.methods()[method].hosts:
        pytest.skip(f"{method} does not run on {host}")


@pytest.fixture(autouse=True)
def _torch_threads():
    """The speed commands set torch's thread count for the process; give the next test the suite's own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shapes_checkpoint(tmp_path_factory):
    """A tiny untrained ShapesVQA-format checkpoint: `vtoken demo` / `quality` end to end in seconds."""
    from vtoken.evals.shapes import model as shapes_model
    from vtoken.evals.shapes import training as train_shapes

    path = tmp_path_factory.mktemp("tiny_shapes")
    processor = shapes_model.build_processor()
    # token clustering needs a tower block before and after it; attn_topk scores after decoder layer 2
    vision = {**train_shapes.TINY["vision"], "num_hidden_layers": 2}
    text = {**train_shapes.TINY["text"], "num_hidden_layers": 4}
    shapes_model.build_model(processor, vision=vision, text=text).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# -- GPU tests (`pytest -m gpu`): run on CUDA; skipped without it, unless VTOKEN_GPU_TESTS_ON_CPU=1 dry-runs them on
# the CPU (Triton through the interpreter, small shapes) so they cannot rot between GPU runs.
GPU_DRY_RUN = os.environ.get("VTOKEN_GPU_TESTS_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or GPU_DRY_RUN:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (VTOKEN_GPU_TESTS_ON_CPU=1 dry-runs it on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu_device() -> torch.device:
    """The device of a `gpu` test: CUDA, or the CPU in a dry run."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_hard_checkpoint(tmp_path_factory):
    """The same, with ShapesVQA-Hard's vocabulary and decoder shape."""
    from vtoken.evals.shapes import hard as shapes_hard
    from vtoken.evals.shapes import model as shapes_model
    from vtoken.evals.shapes import training as train_shapes

    path = tmp_path_factory.mktemp("tiny_hard")
    processor = shapes_model.build_processor(shapes_hard.vocabulary())
    vision = {**train_shapes.TINY["vision"], "num_hidden_layers": 2}
    text = {**train_shapes.TINY["text"], "num_hidden_layers": 4}
    shapes_model.build_model(processor, vision=vision, text=text).save_pretrained(path)
    processor.save_pretrained(path)
    return path
