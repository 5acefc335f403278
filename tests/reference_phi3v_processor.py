"""Run VLM2Vec's Phi-3.5-V image processor and its prompt-to-ids step, unmodified, with the real torchvision.

Run it with the reference interpreter (``bash scripts/reference_env.sh`` prints its path), not the
main test env: torchvision does not install beside the main env's torch. tests/test_images.py
calls it through ``subprocess``; by hand::

    .venv-ref/bin/python tests/reference_phi3v_processor.py OUT.npz < spec.json
    .venv-ref/bin/python tests/reference_phi3v_processor.py OUT.npz --spec spec.json

The spec is JSON::

    {"cases": [{"image": "/path/a.png", "num_crops": 4}, ...],
     "token_sizes": {"num_crops": [1, 4, 9, 16], "sizes": [[height, width], ...]}}

Every key is optional; ``"id_cases": {"tokenizer": DIR, "cases": [[prompt, [num_img_tokens, ...]], ...]}``
adds ``ids_{i}`` (the int64 input ids of case ``i``) from ``Phi3VProcessor._convert_images_texts_to_inputs``
with the tokenizer saved in DIR (only the token counts of the images matter to it). OUT.npz then holds, for case ``i``, what ``preprocess(image,
return_tensors="pt")`` returns for its one image: ``pixel_values_{i}`` (num_crops + 1, 3, 336, 336)
float32, ``image_sizes_{i}`` (2,) int64 as (height, width) and ``num_img_tokens_{i}`` () int64; with
``token_sizes``, ``size_tokens`` (len(num_crops), len(sizes)) int64 from
``calc_num_image_tokens_from_image_size(width, height)``; and ``versions``, the torch, torchvision
and transformers versions that produced them, with torchvision's path.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
from PIL import Image

REFERENCE = "vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.image_processing_phi3_v"
PROCESSING = "vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.processing_phi3_v"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the .npz file to write")
    parser.add_argument("--spec", default="-", help="the JSON spec file; '-' (default) reads stdin")
    args = parser.parse_args(argv)
    if args.spec == "-":
        spec = json.load(sys.stdin)
    else:
        with open(args.spec) as file:
            spec = json.load(file)

    import importlib
    import types

    import torch
    import torchvision
    import transformers

    with warnings.catch_warnings():
        # Its AutoImageProcessor.register call uses an argument transformers has deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        reference = importlib.import_module(REFERENCE)
        processing = importlib.import_module(PROCESSING)

    arrays: dict[str, np.ndarray] = {}
    processors: dict[int, object] = {}
    for index, case in enumerate(spec.get("cases", [])):
        num_crops = int(case["num_crops"])
        if num_crops not in processors:
            processors[num_crops] = reference.Phi3VImageProcessor(num_crops=num_crops)
        with Image.open(case["image"]) as image:
            image.load()
            out = processors[num_crops].preprocess(image, return_tensors="pt")
        arrays[f"pixel_values_{index}"] = out["pixel_values"][0].numpy()
        arrays[f"image_sizes_{index}"] = np.asarray(out["image_sizes"][0], dtype=np.int64)
        arrays[f"num_img_tokens_{index}"] = np.asarray(out["num_img_tokens"][0], dtype=np.int64)

    token_sizes = spec.get("token_sizes")
    if token_sizes is not None:
        arrays["size_tokens"] = np.asarray(
            [
                [
                    reference.Phi3VImageProcessor(
                        num_crops=int(num_crops)
                    ).calc_num_image_tokens_from_image_size(int(width), int(height))
                    for height, width in token_sizes["sizes"]
                ]
                for num_crops in token_sizes["num_crops"]
            ],
            dtype=np.int64,
        )

    id_cases = spec.get("id_cases")
    if id_cases is not None:
        # The method reads only `self.tokenizer`, and of the images only their token counts.
        this = types.SimpleNamespace(
            tokenizer=transformers.AutoTokenizer.from_pretrained(id_cases["tokenizer"])
        )
        for index, (prompt, num_tokens) in enumerate(id_cases["cases"]):
            images = {}
            if num_tokens:
                images = {
                    "pixel_values": torch.zeros(len(num_tokens), 1),
                    "image_sizes": torch.zeros(len(num_tokens), 2),
                    "num_img_tokens": list(num_tokens),
                }
            out = processing.Phi3VProcessor._convert_images_texts_to_inputs(
                this, images, prompt, return_tensors="pt"
            )
            arrays[f"ids_{index}"] = out["input_ids"][0].numpy().astype(np.int64)

    arrays["versions"] = np.asarray(
        [torch.__version__, torchvision.__version__, transformers.__version__, torchvision.__file__]
    )
    np.savez(args.output, **arrays)


if __name__ == "__main__":
    main()
