"""Run MMEB-V2's image eval parsers (vlm2vec-for-pyserini ``data/eval_dataset/image_*.py``), unmodified.

Run it with the reference interpreter (``bash scripts/reference_env.sh`` prints its path)::

    .venv-ref/bin/python tests/reference_mmeb_parsers.py OUT.json < spec.json

The spec is ``{"datasets": [{"parser": "image_qa", "name": "OK-VQA", "image_root": DIR,
"rows": {column: [values...]}}, ...]}`` with the MMEB-V2 instruct columns; OUT.json holds, per
dataset in order, the ``query_text``, ``query_image`` paths, ``cand_text`` and ``cand_image`` paths
each parser's ``data_prepare`` returns for the Phi-3.5-V backbone (the strings MMEB-V1 stored).

Importing the parsers the normal way pulls in the package's whole model zoo (flash-attn, Qwen
kernels) through ``vlm2vec_for_pyserini.model.processor``; of that module the parsers use only
``process_input_text`` and the token tables. Those definitions are taken from its source, as they
are, and the parser files are loaded from the installed package.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

PACKAGE = "vlm2vec_for_pyserini"
PARSERS = ("image_cls", "image_qa", "image_t2i", "image_i2t", "image_i2i_vg")
_FILES = {
    "image_cls": "image_cls_dataset.py",
    "image_qa": "image_qa_dataset.py",
    "image_t2i": "image_t2i_eval.py",
    "image_i2t": "image_i2t_eval.py",
    "image_i2i_vg": "image_i2i_vg_dataset.py",
}


def _package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def _processor_module(root: Path) -> types.ModuleType:
    """``model.processor`` with only its constant tables and ``process_input_text`` (verbatim source)."""
    source = (root / "model" / "processor.py").read_text(encoding="utf-8")
    keep = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        or (isinstance(node, ast.FunctionDef) and node.name == "process_input_text")
    ]
    module = types.ModuleType(f"{PACKAGE}.model.processor")
    namespace = module.__dict__
    namespace["PROMPT_TEMPLATE_DICT"] = {}  # only read for the E5-V backbone
    for node in keep:  # in file order; an assignment that needs what was left out is skipped
        try:
            exec(compile(ast.Module([node], []), str(root / "model" / "processor.py"), "exec"), namespace)
        except (NameError, AttributeError):
            continue
    assert callable(namespace.get("process_input_text")) and "VLM_IMAGE_TOKENS" in namespace
    return module


def _load_parsers() -> dict[str, object]:
    root = _package_root()
    for name, path in ((PACKAGE, root), (f"{PACKAGE}.data", root / "data"),
                       (f"{PACKAGE}.data.eval_dataset", root / "data" / "eval_dataset"),
                       (f"{PACKAGE}.model", root / "model")):  # fmt: skip
        package = types.ModuleType(name)
        package.__path__ = [str(path)]  # submodules load from the installed files
        sys.modules[name] = package
    sys.modules[f"{PACKAGE}.model.processor"] = _processor_module(root)
    parsers = {}
    for parser, file in _FILES.items():
        name = f"{PACKAGE}.data.eval_dataset.{file[:-3]}"
        spec = importlib.util.spec_from_file_location(name, root / "data" / "eval_dataset" / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parsers[parser] = module.data_prepare
    return parsers


def _paths(images: list) -> list[str | None]:
    return [None if image is None else image["paths"][0] for image in images]


def main() -> None:
    spec = json.load(sys.stdin)
    parsers = _load_parsers()
    results = []
    for dataset in spec["datasets"]:
        out = parsers[dataset["parser"]](
            dataset["rows"],
            image_resolution=None,
            model_backbone="phi3_v",
            image_root=dataset["image_root"],
            dataset_name=dataset["name"],
            global_dataset_name=dataset["name"],
        )
        results.append(
            {
                "query_text": [texts[0] for texts in out["query_text"]],
                "query_image": [_paths(images)[0] for images in out["query_image"]],
                "cand_text": out["cand_text"],
                "cand_image": [_paths(images) for images in out["cand_image"]],
            }
        )
    Path(sys.argv[1]).write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    main()
