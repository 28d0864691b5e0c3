"""`python -m dermfast.patch MODEL_NAME [--library timm|transformers]`: what dermfast would fuse in a model.

Builds the named model without weights (timm: `create_model(name, pretrained=False)`; transformers: a model type
such as `vit_mae`, or a local folder holding a config.json, built from its config), on the meta device (no
memory, no download, any size), applies `patch_timm` / `patch_transformers` and prints the report: one line per
module swapped, one per attention-like module left with the reason. Exit 1 with a one-line error if the model
holds nothing to swap, 2 for a bad argument.
"""
from __future__ import annotations

import sys

import torch

from dermfast.cliparse import OneLineParser


def build(name: str, library: str) -> torch.nn.Module:
    """The model `name` from `library`, on the meta device, without weights."""
    with torch.device("meta"):
        if library == "timm":
            import timm
            if not timm.is_model(name):
                raise ValueError(f"timm has no model {name!r} (timm.list_models('*{name}*') lists near names)")
            return timm.create_model(name, pretrained=False)
        from transformers import AutoConfig, AutoModel, AutoModelForPreTraining
        from pathlib import Path
        config = AutoConfig.from_pretrained(name) if Path(name).is_dir() else AutoConfig.for_model(name)
        try:
            return AutoModelForPreTraining.from_config(config)
        except ValueError:  # no pretraining head registered for this model type
            return AutoModel.from_config(config)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dermfast.patch",
                           description="Print what dermfast.patch_timm / patch_transformers would swap in a model "
                                       "(built without weights, on the meta device).")
    parser.add_argument("model", help="timm model name (e.g. eva02_base_patch14_224), or for transformers a model "
                                      "type (e.g. vit_mae) or a local folder with a config.json")
    parser.add_argument("--library", choices=("timm", "transformers"), default="timm",
                        help="which library builds the model (default timm)")
    args = parser.parse_args(argv)
    import dermfast
    try:
        model = build(args.model, args.library)
        built = type(model).__name__
        patch = dermfast.patch_timm if args.library == "timm" else dermfast.patch_transformers
        patch(model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model} ({args.library}, {built})")
    print(dermfast.patch_report(model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
