"""Helpers of ``evals/gpu_suite.sh`` (the one-command GPU suite): the environment check before anything is measured,
the tiny models of a dry run, and the report (a markdown table per benchmark and a summary, with the device named).

``python -m vtoken.evals.bench.gpu_suite env|smoke-models|report ...``; the shell script is the entry point, so it can
install the carried wheels before vtoken or transformers are imported.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# what the suite needs, and what it only reports (a missing one skips the parts that use it)
REQUIRED = ("torch", "transformers", "timm", "accelerate")
OPTIONAL = ("triton", "diffusers", "open-clip-torch", "tokenizers", "huggingface-hub", "safetensors", "flash-attn")


# -- environment -----------------------------------------------------------------------------------------------------
def declared_ranges(pyproject: Path) -> dict[str, str]:
    """Package -> specifier of vtoken's dependencies (pyproject.toml: the suite runs vtoken from its checkout, which
    has no installed metadata to read them from)."""
    import tomllib  # Python >= 3.11, as on every machine the suite runs on

    from vtoken.adapters._compat import ranges_of

    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return ranges_of(lines)


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(site: Path) -> list[str]:
    """Requirements of the distributions installed from the wheelhouse into ``site`` that the environment, as it is
    now, does not meet (a wheel's needs are not installed with --no-deps; the image must already hold them)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    for dist in importlib.metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = version(req.name)
            if have is None:
                problems.append(f"{dist.metadata['Name']} needs {req}, which is not installed")
            elif req.specifier and Version(have) not in req.specifier:
                problems.append(f"{dist.metadata['Name']} needs {req}; {req.name} {have} is installed")
    return problems


def check_environment(device: str, pyproject: Path, site: Path | None) -> dict:
    import torch

    info = {"python": platform.python_version(), "device": device,
            "versions": {name: version(name) for name in REQUIRED + OPTIONAL}}
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    fatal, notes = [], []
    if device == "cuda" and not torch.cuda.is_available():
        fatal.append("--device cuda, but torch sees no CUDA device")
    ranges = declared_ranges(pyproject)
    for name in REQUIRED + OPTIONAL:
        have, spec = info["versions"][name], ranges.get(name)
        if have is None:
            (fatal if name in REQUIRED else notes).append(f"{name} is not installed")
        elif spec:
            from packaging.specifiers import SpecifierSet
            from packaging.version import Version

            if Version(have) not in SpecifierSet(spec):
                # transformers below 5.18 drops the images silently: never measure on it
                (fatal if name in REQUIRED else notes).append(f"{name} {have} is outside vtoken's range {spec}")
    if device == "cuda" and info["versions"]["triton"] is None:
        fatal.append("triton is not installed: the kernels cannot run")
    if site is not None:  # transformers must work; an unmet need of another wheel only disables what uses it
        for problem in unmet_requirements(site):
            (fatal if problem.startswith(("transformers ", "tokenizers ")) else notes).append(problem)
    import vtoken

    info["vtoken_source"] = str(Path(vtoken.__file__).resolve().parent.parent)
    info["attention"] = ("flash_attention_2" if info["versions"]["flash-attn"] else
                         "sdpa, flash backend" if device == "cuda" else "sdpa, math backend (dry run)")
    info["fatal"], info["notes"] = fatal, notes
    return info


def device_line(info: dict) -> str:
    where = info.get("gpu") or "CPU (dry run: no figure here is a GPU measurement)"
    v = info["versions"]
    return (f"{where}; Python {info['python']}, torch {v['torch']} (CUDA {info['torch_cuda']}), triton {v['triton']}, "
            f"transformers {v['transformers']}, diffusers {v['diffusers']}, timm {v['timm']}")


# -- smoke models ------------------------------------------------------------------------------------------------------
def write_smoke_models(out: Path) -> None:
    """Tiny random-weight LLaVA and LLaVA-NeXT configs (folders for ``vtoken bench --model DIR --random-weights``)."""
    from transformers import LlavaConfig, LlavaNextConfig

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=112, patch_size=14)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    common = dict(text_config=text, image_token_id=999, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    LlavaConfig(vision_config=vision, **common).save_pretrained(out / "llava")
    LlavaNextConfig(vision_config={**vision, "image_size": 56}, **common,
                    image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]]).save_pretrained(out / "llava_next")


# -- report ------------------------------------------------------------------------------------------------------------
def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def number(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def bench_markdown(report: dict) -> str:
    rows = []
    for r in report["results"]:
        label = f"{r['method']} " + ",".join(f"{k}={v}" for k, v in r["config"].items())
        overhead = r["selection_ms"] + r["scoring_ms"]
        rows.append([label.strip(), number(r["visual_tokens_llm"], ".0f"), number(r["ttft_ms"], ".1f"),
                     number(r.get("speedup", 1.0), ".2f") + "x", number(r.get("ideal_speedup"), ".2f"),
                     number(r.get("of_ideal"), ".2f"), number(r["decode_tok_s"], ".1f"),
                     number(r["peak_mem_mb"], ".0f"), number(r["prefill_gflops"], ".1f"),
                     number(r.get("flops_ratio", 1.0), ".2f") + "x",
                     "-" if math.isnan(overhead) else f"{overhead:.2f} ({r['overhead_pct_of_prefill']:.1f}%)"])
    table = markdown(["method", "visual->LLM", "TTFT ms", "speed-up", "ideal speed-up", "measured/ideal",
                      "decode tok/s", "peak MB", "prefill GFLOPs", "FLOPs ratio", "selection+scoring ms (% TTFT)"],
                     rows)
    return f"{report['title']}\n\n{report.get('roofline', '')}\n\n{table}\n"


def vit_markdown(report: dict) -> str:
    rows = [[r["model"], r["batch"], f"{r['grid']} -> {r['clusters']}", number(r["dense_img_s"], ".1f"),
             number(r["patched_img_s"], ".1f"), number(r["speedup"], ".2f") + "x", f"{r['mac_ratio']:.1%}",
             number(r["overhead_ms"], ".2f")] for r in report["results"]]
    table = markdown(["model", "batch", "tokens", "dense img/s", "clustered img/s", "speed-up", "MACs",
                      "clustering overhead ms"], rows)
    return f"{report['settings'].get('dtype')}, token_clustering, random weights\n\n{table}\n"


def dit_markdown(report: dict) -> str:
    s = report["shape"]
    head = (f"{s['heads']} heads x {s['tokens']} tokens x d{s['head_dim']} {s['dtype']}, clusters {s['q_clusters']} / "
            f"{s['k_clusters']}; dense SDPA {report['dense_ms']:.2f} ms, k-means init "
            f"{report['kmeans_init_ms']:.2f} ms, warm {report['kmeans_warm_ms']:.2f} ms "
            f"({100 * report['kmeans_warm_over_dense']:.1f}% of dense)")
    rows = [[r["top_p"], f"{r['density']:.3f}", f"{r['recall']:.3f}", f"{r['relative_error']:.4f}",
             f"{r['plan_ms']:.2f}", f"{r['attention_ms']:.2f}", f"{r['kernel_ms']:.2f}", f"{r['ideal_speedup']:.2f}",
             f"{r['attention_speedup']:.2f}", f"{r['kernel_speedup']:.2f}", f"{r['attention_efficiency']:.2f}"]
            for r in report["results"]]
    head_row = ["top_p", "density", "recall", "rel. error", "plan ms", "attention ms", "kernel ms", "ideal x",
                "attention x", "kernel x", "attention / ideal"]
    return head + "\n\n" + markdown(head_row, rows) + "\n"


def kernels_markdown(report: dict) -> str:
    rows = [[r["kernel"], r["case"], r["size"], r["batch"], number(r["reference_ms"], ".3f"),
             number(r["triton_ms"], ".3f"), "-" if r["speedup"] is None else f"{r['speedup']:.1f}x", r["agree"]]
            for r in report["results"]]
    return report["dtype"] + "\n\n" + markdown(["kernel", "case", "size", "batch", "reference ms", "Triton ms",
                                                "speed-up", "outputs"], rows) + "\n"


def pytest_summary(xml: Path) -> dict:
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [case.get("classname", "") + "::" + case.get("name", "") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


RENDERERS = {"bench": bench_markdown, "bench_vit": vit_markdown, "bench_dit": dit_markdown,
             "bench_kernels": kernels_markdown}


def write_report(out: Path) -> str:
    """One markdown file beside each benchmark's JSON, and README.md: device, versions, every part's status."""
    env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else None
    device = device_line(env) if env else "environment check did not run"
    sections = []
    for path in sorted(out.rglob("*.json")):
        if path.name in ("environment.json", "pytest_gpu.json"):
            continue
        kind = path.stem if path.stem in RENDERERS else "bench"
        try:
            body = RENDERERS[kind](json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as error:
            body = f"(could not render {path.name}: {error!r})\n"
        name = path.parent.name if path.parent != out else path.stem
        path.with_suffix(".md").write_text(f"# {name}\n\nDevice: {device}\n\n{body}")
        sections.append(f"## {name}\n\n{body}")
    if (out / "pytest_gpu.xml").exists():
        summary = pytest_summary(out / "pytest_gpu.xml")
        (out / "pytest_gpu.json").write_text(json.dumps(summary, indent=2))
        passed = summary["tests"] - summary["failures"] - summary["errors"] - summary["skipped"]
        line = (f"{passed} passed, {summary['failures'] + summary['errors']} failed, {summary['skipped']} skipped"
                + "".join(f"\n- FAILED {name}" for name in summary["failed"]))
        sections.insert(0, f"## pytest -m gpu\n\n{line}\n")
    parts = (out / "parts.tsv").read_text().splitlines() if (out / "parts.tsv").exists() else []
    table = markdown(["part", "status", "seconds", "share (s)"], [p.split("\t") for p in parts])
    notes = "".join(f"- {n}\n" for n in (env or {}).get("notes", []))
    text = (f"# GPU suite results\n\nDevice: {device}\n\nWritten by `evals/gpu_suite.sh`; raw JSON and logs beside "
            f"this file.\n\n{table}\n\n{notes}\n" + "\n".join(sections))
    (out / "README.md").write_text(text)
    return text


# -- CLI ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtoken.evals.bench.gpu_suite")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="check and record the environment; exit 1 if the suite must not measure")
    env.add_argument("--device", choices=["cuda", "cpu"], required=True)
    env.add_argument("--out", type=Path, required=True)
    env.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    env.add_argument("--site", type=Path, default=None, help="where the wheelhouse was installed")
    smoke = sub.add_parser("smoke-models", help="write the tiny configs of a dry run")
    smoke.add_argument("--out", type=Path, required=True)
    report = sub.add_parser("report", help="markdown per benchmark + README.md")
    report.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "env":
        info = check_environment(args.device, args.pyproject, args.site)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "environment.json").write_text(json.dumps(info, indent=2))
        print(device_line(info))
        for note in info["notes"]:
            print(f"note: {note}")
        for problem in info["fatal"]:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if info["fatal"] else 0
    if args.command == "smoke-models":
        write_smoke_models(args.out)
        return 0
    print(write_report(args.out))
    return 0


if __name__ == "__main__":
    importlib.import_module("vtoken")  # fail here, not halfway, if vtoken is not importable
    sys.exit(main())
