"""Recipes of `python -m dermfast.pipeline` and the plan of stages they run.

A recipe is {option group: {option: value}}: the group `data` applies to every training stage (so every stage
reads the same dataset and splits it the same way), `synth`, `mae`, `finetune`, `distill` to that training
stage, `synth_set` to `python -m dermfast.synthesize`, `eval` to every `python -m dermfast.evaluate` run,
`export` to `python -m dermfast.export`. `--set GROUP.KEY=VALUE` overrides a recipe value (`all.KEY` sets KEY
in every training stage). Ablation runs take their group's options (mae_nosynth: mae's, finetune_*: finetune's),
so they differ from the main chain in one thing only.

- demo: the embedded procedural dataset (1200 images of 64 px), CPU-sized models (the `demo` MAE preset, 1.8 M
  parameters as a classifier; timm's `test_vit` student); the whole pipeline in about 5 minutes on 2 cores.
- paper: DerMAE (Filho et al. 2026, arXiv 2602.19848): class-conditioned latent diffusion balances the classes
  (synthesize --balance-to the data: every class brought up to the largest one), ViT-H/14 MAE pretrained at 224 px
  on real + synthetic images, fine-tuned as the teacher, soft-target KD into a ViT-S/16 student. Give --data
  (HAM10000); epochs follow the MAE paper's recipe (800 pretraining, 50 fine-tuning) and are one --set away.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TRAIN_STAGES = ("synth", "mae", "finetune", "distill")
TOOL_GROUPS = ("synth_set", "eval", "export")
GROUPS = ("all", "data", *TRAIN_STAGES, *TOOL_GROUPS)
ABLATIONS = ("synthetic", "mae")

RECIPES: dict[str, dict[str, dict]] = {
    "demo": {
        "data": {"toy_images": 1200, "toy_image_size": 64, "loader": "torch", "seed": 0, "progress": False},
        "synth": {"size": "tiny", "img_size": 32, "vae_steps": 40, "max_steps": 80, "batch_size": 16,
                  "sample_every": 0, "grid_per_class": 4, "sample_steps": 10, "lr": 2e-3, "warmup_epochs": 0.0},
        "synth_set": {"per_class": 12, "steps": 10, "batch_size": 32},
        "mae": {"preset": "demo", "img_size": 64, "epochs": 12, "batch_size": 64, "warmup_epochs": 1.0},
        "finetune": {"preset": "demo", "img_size": 64, "epochs": 10, "batch_size": 64, "warmup_epochs": 1.0},
        "distill": {"student": "test_vit", "img_size": 64, "epochs": 8, "batch_size": 64,
                    "warmup_epochs": 1.0},
        "eval": {"bootstrap": 200, "explain": 2},
        "export": {"format": "onnx"},
    },
    "paper": {
        "data": {"seed": 0},
        "synth": {"size": "small", "img_size": 256, "epochs": 100, "batch_size": 32},
        "synth_set": {"balance_to": "{data}", "steps": 50, "sampler": "ddim", "guidance": 2.0},
        # per-rank batches: on one 8-GPU node, MAE 64 x 8 accum x 8 = 4096 images per step and fine-tuning
        # 32 x 4 x 8 = 1024, the MAE paper's (He et al. 2021, ViT-H: blr 1.5e-4 pretraining, 1e-3 fine-tuning,
        # layer decay 0.75, drop path 0.3); the student's KD lr is DeiT's 5e-4 per 512 images (blr 2.5e-4).
        "mae": {"preset": "vit_h14", "img_size": 224, "epochs": 800, "batch_size": 64, "accum_steps": 8,
                "blr": 1.5e-4, "warmup_epochs": 40.0, "checkpoint_every": 500},
        "finetune": {"preset": "vit_h14", "img_size": 224, "epochs": 50, "batch_size": 32, "accum_steps": 4,
                     "blr": 1e-3, "layer_decay": 0.75, "drop_path": 0.3, "mixup": 0.8, "cutmix": 1.0,
                     "warmup_epochs": 5.0, "checkpoint_every": 500},
        "distill": {"student": "vit_small_patch16_224", "img_size": 224, "kd": "soft", "temperature": 4.0,
                    "alpha": 0.9, "epochs": 100, "batch_size": 64, "blr": 2.5e-4, "checkpoint_every": 500},
        "eval": {"bootstrap": 1000},
        "export": {"format": "onnx"},
    },
}


@dataclass
class StageSpec:
    """One step of the plan: `name` is its folder under --out and the name progress lines use."""
    name: str
    kind: str                    # "train" | "synthesize" | "evaluate" | "export"
    group: str                   # the recipe / --set group whose options it takes
    train_stage: str | None = None
    needs: tuple[str, ...] = ()  # folders (stage names) of --out it reads
    wired: dict = field(default_factory=dict)  # options the pipeline sets: {key: stage name whose folder it is}
    model: str = ""              # report: what the evaluated model is


def plan(ablate: tuple[str, ...] = ()) -> list[StageSpec]:
    """Every stage of the pipeline in run order (the main chain, then the ablation runs)."""
    S = StageSpec
    steps = [
        S("synth", "train", "synth", "synth"),
        S("synth_set", "synthesize", "synth_set", needs=("synth",), wired={"checkpoint": "synth"}),
        S("mae", "train", "mae", "mae", needs=("synth_set",), wired={"synthetic": "synth_set"}),
        S("finetune", "train", "finetune", "finetune", needs=("mae",), wired={"init": "mae"}),
        S("distill", "train", "distill", "distill", needs=("finetune",), wired={"teacher": "finetune"}),
        S("eval_teacher", "evaluate", "eval", needs=("finetune",), wired={"checkpoint": "finetune"},
          model="teacher (MAE on real + synthetic, fine-tuned)"),
        S("eval_student", "evaluate", "eval", needs=("distill",), wired={"checkpoint": "distill"},
          model="student (distilled from the teacher)"),
        S("export", "export", "export", needs=("distill",), wired={"checkpoint": "distill"}),
    ]
    if "synthetic" in ablate:
        steps += [
            S("mae_nosynth", "train", "mae", "mae"),
            S("finetune_nosynth", "train", "finetune", "finetune", needs=("mae_nosynth",),
              wired={"init": "mae_nosynth"}),
            S("eval_nosynth", "evaluate", "eval", needs=("finetune_nosynth",), wired={"checkpoint": "finetune_nosynth"},
              model="ablation: teacher without synthetic images (MAE on real only)"),
        ]
    if "mae" in ablate:
        steps += [
            S("finetune_nomae", "train", "finetune", "finetune"),
            S("eval_nomae", "evaluate", "eval", needs=("finetune_nomae",), wired={"checkpoint": "finetune_nomae"},
              model="ablation: teacher without MAE pretraining (from scratch, same fine-tuning steps)"),
        ]
    return steps


STAGE_NAMES = tuple(s.name for s in plan(ABLATIONS))
