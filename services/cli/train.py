"""Training commands: `editstream train recipe`, `train relation-gate` and `train rledit`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from editstream.methods.rledit.config import UPDATES
from editstream.models import EMBEDDED_ENCODER, EMBEDDED_LLM

log = logging.getLogger("editstream")


def _train(args: argparse.Namespace) -> int:
    return {"relation-gate": _train_gate, "rledit": _train_rledit}.get(args.method, _train_recipe)(args)


def _train_rledit(args: argparse.Namespace) -> int:
    from editstream.config import config_from_dict
    from editstream.data import load_edits
    from editstream.methods.rledit.config import RLEditConfig, TrainConfig
    from editstream.methods.rledit.train import RLEditTrainer
    from editstream.models import load_causal_lm

    lm = load_causal_lm(args.model, device=args.device)
    edits = [e for name in args.data for e in load_edits(name)]
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else ()
    config = config_from_dict(
        RLEditConfig,
        {
            "layers": layers,
            "rank": args.rank,
            "positions": args.positions,
            "batch": args.edit_batch,
            "init_lr": args.init_lr,
            "null_space": args.null_space,
            "modules": tuple(args.modules.split(",")),
        },
    )
    schedule = config_from_dict(
        TrainConfig,
        {
            "trajectories": args.trajectories,
            "trajectory": args.trajectory_batches,
            "batch": args.edit_batch,
            "backtrack": args.backtrack,
            "l2_weight": args.l2_weight,
            "locality_weight": 1.0 if args.locality_weight is None else args.locality_weight,
            "lr": 1e-4 if args.lr is None else args.lr,
            "log_lr": args.log_lr,
            "update": args.update,
            "validate_every": args.validate_every or 10,
            "validation_edits": args.validation_edits,
            "cache_below": not args.no_cache_below,
            "seed": args.seed,
        },
    )
    state = RLEditTrainer(lm, edits, Path(args.out), config, schedule).run()
    summary = {"best": state["best"], "trajectories": state["trajectory"], "seconds": state["seconds"]}
    print(json.dumps(summary, indent=2))
    return 0


def _train_gate(args: argparse.Namespace) -> int:
    from editstream.data import load_edits
    from editstream.methods.recipe.relation import train_gate
    from editstream.models import load_encoder

    encoder = load_encoder(args.encoder, device=args.device)
    edits = [e for name in args.data for e in load_edits(name)]
    gate = train_gate(encoder, edits, steps=args.gate_steps, seed=args.seed)
    gate.info["data"] = list(args.data)
    gate.info["encoder"] = args.encoder
    gate.save(Path(args.out))
    print(json.dumps({"threshold": gate.threshold, **gate.info}, indent=2))
    return 0


def _train_recipe(args: argparse.Namespace) -> int:
    from editstream.config import config_from_dict
    from editstream.data import load_edits
    from editstream.methods.recipe.config import RecipeConfig, TrainConfig
    from editstream.methods.recipe.train import Trainer
    from editstream.models import load_causal_lm, load_encoder

    lm = load_causal_lm(args.model, device=args.device)
    encoder = load_encoder(args.encoder, device=args.device)
    edits = [e for name in args.data for e in load_edits(name)]
    config = config_from_dict(
        RecipeConfig,
        {
            "encoder": args.encoder,
            "generator_input": args.generator_input,
            "prompt_len": args.prompt_len,
            "target_mode": args.target_mode,
            "target_slots": args.target_slots,
            "end_slots": args.end_slots,
        },
    )
    schedule = config_from_dict(
        TrainConfig,
        {
            "retriever_steps": args.retriever_steps,
            "retriever_lr": args.retriever_lr,
            "generator_steps": args.steps,
            "generator_batch": args.batch,
            "generator_lr": 1e-3 if args.lr is None else args.lr,
            "locality_weight": 0.0 if args.locality_weight is None else args.locality_weight,
            "continuation_weight": args.continuation_weight,
            "continuation_tokens": args.continuation_tokens,
            "end_text": args.end_text,
            "subject_negatives": args.subject_negatives,
            "chat_form": args.chat_form,
            "validate_every": args.validate_every or 100,
            "seed": args.seed,
        },
    )
    init_from = Path(args.init_from) if args.init_from else None
    state = Trainer(lm, encoder, edits, Path(args.out), config, schedule, init_from).run()
    print(json.dumps(state["history"][-1] if state["history"] else {}, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method's networks (RECIPE, RLEdit) on the train splits")
    p.add_argument(
        "method",
        choices=["recipe", "relation-gate", "rledit"],
        help="recipe: retriever and prompt generator; relation-gate: RECIPE's subject-blind second key "
        "(writes relation-gate.* into --out, beside a checkpoint); rledit: the hypernetworks, on "
        "trajectories of edit batches",
    )
    p.add_argument("--out", required=True, help="directory for checkpoints (resumes if it holds one)")
    p.add_argument(
        "--data",
        nargs="+",
        default=["counterfact-train", "zsre-train"],
        help="training files or aliases (never an edit.json split)",
    )
    p.add_argument("--model", default=EMBEDDED_LLM, help="causal LM: embedded name, HF id or local path")
    p.add_argument("--encoder", default=EMBEDDED_ENCODER, help="sentence encoder: embedded name, HF id or path")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")
    p.add_argument(
        "--generator-input",
        default="prompt+target",
        choices=["prompt+target", "statement"],
        help="'statement': the paper's generator input; 'prompt+target': our variant",
    )
    p.add_argument("--prompt-len", type=int, default=3, help="generated prompt vectors per edit")
    p.add_argument(
        "--target-mode",
        default="appended",
        choices=["appended", "inside"],
        help="variant only: target tokens as extra slots (appended) or added onto generated slots",
    )
    p.add_argument("--target-slots", type=int, default=12, help="variant only: target tokens the prompt carries")
    p.add_argument("--steps", type=int, default=600, help="generator training steps")
    p.add_argument("--retriever-steps", type=int, default=3000, help="retriever training steps")
    p.add_argument("--batch", type=int, default=16, help="generator batch size (facts per step)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (recipe generator 1e-3, rledit 1e-4)")
    p.add_argument(
        "--locality-weight", type=float, default=None, help="weight of the locality KL term (recipe 0, rledit 1)"
    )
    p.add_argument(
        "--continuation-weight",
        type=float,
        default=1.0,
        help="weight of the KL, after the target, to the unedited model reading 'prompt target' (0: off)",
    )
    p.add_argument("--continuation-tokens", type=int, default=12, help="teacher continuation length (tokens)")
    p.add_argument("--end-slots", type=int, default=2, help="learned prefix slots after the target (0: none)")
    p.add_argument("--end-text", default=".\n", help="text whose token embeddings start the end slots")
    p.add_argument(
        "--subject-negatives",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="retriever negatives: the edit's subject in other relations' prompts, its prompt with other subjects",
    )
    p.add_argument(
        "--chat-form",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train question rows as a chat turn (prefix before the user's words, target first in the reply)",
    )
    p.add_argument("--retriever-lr", type=float, default=2e-3, help="retriever learning rate")
    p.add_argument(
        "--init-from",
        default=None,
        help="warm start from this checkpoint directory (weights whose shapes agree), e.g. the packaged one",
    )
    p.add_argument(
        "--validate-every",
        type=int,
        default=None,
        help="steps (recipe, 100) or trajectories (rledit, 10) between validations",
    )
    r = p.add_argument_group("rledit")
    r.add_argument("--trajectories", type=int, default=200, help="trajectories to train on")
    r.add_argument(
        "--update",
        default="trajectory",
        choices=UPDATES,
        help="optimiser step once per trajectory (its steps' gradients added up) or after every edit batch",
    )
    r.add_argument("--trajectory-batches", type=int, default=8, help="edit batches per trajectory")
    r.add_argument("--edit-batch", type=int, default=20, help="edits solved together")
    r.add_argument("--backtrack", type=int, default=3, help="earlier batches re-scored at each step")
    r.add_argument("--l2-weight", type=float, default=1e-3, help="weight of the shift's squared norm")
    r.add_argument(
        "--log-lr", type=float, default=1e-2, help="learning rate of the learnt log step sizes and log ridge strengths"
    )
    r.add_argument("--rank", type=int, default=256, help="hypernetwork block bottleneck")
    r.add_argument(
        "--init-lr", type=float, default=3e-4, help="starting per-module step on the value change (learnt from there)"
    )
    r.add_argument("--layers", default="", help="edited decoder layers, comma-separated (default: 60-80%% of depth)")
    r.add_argument("--positions", default="answer", choices=["answer", "all"], help="where keys are read")
    r.add_argument(
        "--modules",
        default="gate_proj,up_proj",
        help="edited projections of each layer's MLP, comma-separated (e.g. down_proj; GPT-2: c_fc)",
    )
    r.add_argument(
        "--null-space",
        type=float,
        default=0.0,
        help="confine shifts to input directions whose second moment on ordinary text is below this fraction "
        "of the mean (AlphaEdit's projection; e.g. 0.05); 0: off",
    )
    r.add_argument("--validation-edits", type=int, default=100, help="held-back train edits scored as it goes")
    r.add_argument(
        "--no-cache-below",
        action="store_true",
        help="run every layer on every forward (default: a trajectory keeps the hidden states entering the "
        "edited band for inputs it forwards again; same losses, fewer layers run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-steps", type=int, default=3000, help="relation-gate: training steps")
    p.set_defaults(func=_train)
