"""The `adclr` command: train, eval knn|linear|dense, compare, show, export.

    adclr train --out runs/demo                      # built-in data, quick CPU demo defaults
    adclr train --data /imagenet --out runs/vits16   # paper defaults
    torchrun --nproc-per-node 8 -m adclr.cli train --data /imagenet --out runs/vits16
    adclr eval knn --checkpoint runs/demo/checkpoint.pt
    adclr eval dense --checkpoint runs/demo/checkpoint.pt   # linear segmentation probe, built-in scenes
    adclr show attention --checkpoint runs/demo/checkpoint.pt
    adclr compare --out runs/compare                          # ADCLR vs DINO vs random init, 3 seeds
    adclr sweep --vary teacher-temp=0.02,0.04                 # compare's settings tried on a held-out split
    adclr export --checkpoint runs/demo/checkpoint.pt --out backbone.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.metadata
import inspect
import json
import os
import re
import shlex
import signal
import sys
import threading

import torch

from . import compare, eval_dense, eval_knn, eval_linear, export, show, train
from .checkpoint import WriteError
from .config import ALLOWED, RESUMABLE, Config, config_errors, value_error
from .data import BUILTIN

# A quick run that shows the method working on a laptop CPU in a few minutes: used when
# there is neither a dataset nor a GPU, for every flag the user did not set.
DEMO = {
    "arch": "vit_mini", "patch_size": 16, "image_size": 64, "local_size": 32,
    "num_local_crops": 2, "num_queries": 4, "batch_size": 32,
    # A head sized to the backbone (DINO's 2048-wide MLP and 65536 prototypes are for
    # ViT-S and up): 2048 wide and 4096 out took 60% more CPU time for k-NN gains within
    # the noise of these (+6.7 and +6.6 points over seeds 0 and 1, against +5.7 and +6.0).
    "head_hidden_dim": 512, "out_dim": 1024,
    "epochs": 1, "warmup_epochs": 0.1, "warmup_teacher_temp_epochs": 0.3,
    "freeze_last_layer_epochs": 0.03, "checkpoint_every": 100,
    # Short runs: a faster-moving teacher, and DINO's stable teacher temperature (0.07
    # collapsed to a uniform output in these few hundred steps).
    "teacher_temp": 0.04, "momentum_teacher": 0.99,
}


def _field_help():
    """Help text for each Config field, from the comment on its line."""
    source = inspect.getsource(Config)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", source, re.M))


def checked(kind, allowed=None):
    """An argparse `type`: parse with `kind`, then hold the value to an ALLOWED-style entry.

    A value out of range is argparse's usual error: "argument --flag: must be >= 1, got 0".
    """
    def parse(text):
        value = kind(text)  # ValueError: argparse says "invalid int value: 'x'"
        problem = value_error(value, allowed) if allowed is not None else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser, defaults=None, hidden=(), helps=None):
    """One --flag per Config field. Defaults are SUPPRESSed so we know what was set; the
    help shows `defaults` (the command's preset) where given, else Config's, and leaves
    out the `hidden` flags (a command that refuses them, saying what to give instead);
    `helps` replaces a field's help where the command gives it another meaning."""
    helps, defaults = {**_field_help(), **(helps or {})}, defaults or {}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        allowed = ALLOWED.get(f.name)
        limit = f", {allowed}" if isinstance(allowed, str) else ""
        text = f"{helps.get(f.name, '')} (default: {defaults.get(f.name, f.default)}{limit})".strip()
        text = argparse.SUPPRESS if f.name in hidden else text
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, type=checked(type(f.default[0]), allowed), nargs=len(f.default),
                                metavar=("LOW", "HIGH"), default=argparse.SUPPRESS, help=text)
        elif isinstance(allowed, tuple):
            parser.add_argument(flag, choices=allowed, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=checked(type(f.default), allowed), default=argparse.SUPPRESS, help=text)


def is_demo(cfg):
    """A run on the built-in data without a GPU: the demo."""
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return cfg.data in ("", *BUILTIN) and on_cpu


def make_config(given):
    """(Config from the flags given, whether it is the demo's): on CPU with the built-in data,
    the DEMO defaults fill the rest. A run resumed in --out keeps them if it ran with them
    (`_ran_the_demo`), and only then: a demo run resumed on other data or a GPU goes on
    with its settings, as a resume with --data or --device changed does."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    cfg = Config(**given)
    saved = _saved_settings(cfg.out)
    demo = is_demo(cfg) if saved is None else _ran_the_demo(saved, given, is_demo(cfg))
    if demo:
        # A resumed demo run keeps what it ran with, where the presets have changed since.
        kept = {} if saved is None else {k: saved[k] for k in DEMO if k in saved and k not in RESUMABLE}
        chosen = {k: kept.get(k, v) for k, v in DEMO.items() if k not in given}
        cfg = dataclasses.replace(cfg, **chosen)
        if chosen:
            why = ("the run in --out ran with them" if saved is not None and not is_demo(cfg)
                   else "built-in data and no GPU")
            if os.environ.get("RANK", "0") == "0":
                print(f"{why}: quick demo settings (any flag overrides them): {json.dumps(chosen)}",
                      file=sys.stderr)
    return cfg, demo


def _ran_the_demo(saved, given, demo_now):
    """Whether a run's saved settings took the DEMO presets: they match them on more of the
    flags not given now than they match Config's defaults (a tie, as when every preset is
    given: demo_now, what a new run would be). A flag given when the run started moves one
    of them off both: one that may change on resume (--checkpoint-every) need not be given
    again, and another (--arch) is the one flag a resume without it names. Such a flag used
    to make a demo run read as a paper one, its resume refused over a dozen flags."""
    defaults = Config()
    flags = [k for k, v in DEMO.items() if k not in given and v != getattr(defaults, k)]
    as_demo = sum(saved.get(k) == DEMO[k] for k in flags)
    as_paper = sum(saved.get(k) == getattr(defaults, k) for k in flags)
    return demo_now if as_demo == as_paper else as_demo > as_paper


def _saved_settings(out):
    """The settings of the run `out` holds to resume (its config.json, beside its
    checkpoint.pt), or None: nothing to resume there (a config.json alone, left by a run
    that never saved or whose checkpoint was removed to start over, says nothing of this
    run), or a config.json that cannot be read (the run rewrites it). Never opens what is
    not a regular file (a fifo would block)."""
    config, checkpoint = (os.path.join(out, name) for name in ("config.json", "checkpoint.pt"))
    if not out or not all(os.path.isfile(p) for p in (config, checkpoint)):
        return None
    try:
        with open(config) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _version():
    try:
        return importlib.metadata.version("adclr")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "(not installed)"


class _Parser(argparse.ArgumentParser):
    """Flags spelled in full only (and so every command's parser, which add_subparsers makes
    of this class): argparse's prefix matching took --epoch for --epochs, and eval's
    --checkpoint given to train for train's --checkpoint-every."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})


def _unrecognized(parser, unknown):
    """argparse's message for flags a command does not take, with the flag each one looks
    like (DINO's --batch_size is --batch-size here)."""
    flags = [flag for action in parser._actions for flag in action.option_strings]
    hints = []
    for arg in unknown[:unknown.index("--")] if "--" in unknown else unknown:  # past "--": values
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or name in flags:
            continue
        spelled = name.replace("_", "-")
        # What the name begins (a prefix argparse once took), else what it is closest to.
        close = [f for f in flags if f.startswith(spelled)][:3] or difflib.get_close_matches(
            spelled, flags, n=1, cutoff=0.75)
        hints += [f"{name}: did you mean {' or '.join(close)}?"] if close else []
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def build_parser():
    """The `adclr` parser. Each command's parser sets `handler`, the function that runs the
    command, and `parser`, itself (its errors start "adclr <command>: error:")."""
    parser = _Parser(prog="adclr", description="ADCLR self-supervised ViT pretraining")
    parser.add_argument("--version", action="version", version=f"adclr {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    # The one-line usage: the full one lists ~40 flags and would bury a one-line error.
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items())
    train_parser = commands.add_parser(
        "train", help="pretrain (resumes when --out holds a checkpoint)",
        usage="adclr train [--flag VALUE ...]  (adclr train --help lists them)",
        description=f"The defaults below are DINO's (main_dino.py) with ADCLR's query crops (docs/training.md). "
                    f"With the built-in data and no GPU (the demo), "
                    f"every flag not given takes the demo's setting instead: {demo}.")
    add_config_flags(train_parser)
    train_parser.set_defaults(handler=run_train, parser=train_parser)
    _add_eval_parser(commands)
    _add_compare_parser(commands)
    _add_sweep_parser(commands)
    _add_show_parser(commands)
    export_parser = commands.add_parser("export", help="write the backbone as safetensors")
    export_parser.add_argument("--checkpoint", required=True)
    export_parser.add_argument("--out", required=True, help="output .safetensors file")
    export_parser.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                                help="which network's backbone (default: teacher)")
    export_parser.set_defaults(handler=run_export, parser=export_parser)
    return parser


def _add_eval_parser(commands):
    eval_parser = commands.add_parser("eval", help="evaluate frozen features: knn, linear or dense")
    eval_parser.add_argument("protocol", choices=["knn", "linear", "dense"],
                             help="knn, linear: image classes from CLS; dense: a linear segmentation "
                                  "probe on patch tokens")
    eval_parser.add_argument("--checkpoint", required=True, help="OUT/checkpoint.pt of a run")
    eval_parser.add_argument("--data", default=None,
                             help="knn, linear: folder with train/ and val/ (one sub-folder per class); "
                                  "default: the run's data. dense: folder with images/ and masks/ or "
                                  "annotations/ (PNG label masks, 255 = ignore), each with train/ and val/ "
                                  "(or the reverse nesting); default: the run's data if built in, else "
                                  "builtin:grey-ground-scenes")
    eval_parser.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                                help="which network's backbone (default: teacher)")
    eval_parser.add_argument("--image-size", type=checked(int, ">= 1"), default=None,
                             help="default: the run's --image-size")
    eval_parser.add_argument("--batch-size", type=checked(int, ">= 1"), default=128,
                             help="linear: the lr is --lr x batch / 256 (default: 128)")
    eval_parser.add_argument("--k", type=checked(int, ">= 1"), nargs="+", default=list(eval_knn.KNN_K),
                             help="k-NN: neighbours that vote; every k from one similarity pass "
                                  "(default: DINO's 10 20 100 200)")
    eval_parser.add_argument("--temperature", type=checked(float, "> 0"), default=0.07,
                             help="k-NN: votes weigh exp(similarity / temperature) (default: 0.07)")
    eval_parser.add_argument("--epochs", type=checked(int, ">= 1"), default=None,
                             help=f"linear: training epochs (default: 100; {eval_linear.BUILTIN_CPU_LINEAR_EPOCHS} "
                                  f"for the built-in data on CPU; with --fast, L-BFGS iterations, default "
                                  f"{eval_linear.PROBE_EPOCHS}); dense: probe epochs over the cached train features "
                                  f"(default: {eval_dense.DEFAULT_EPOCHS})")
    # The former name, kept working; a separate flag so that an error names the one typed.
    eval_parser.add_argument("--linear-epochs", dest="epochs", type=checked(int, ">= 1"), default=None,
                             help=argparse.SUPPRESS)
    eval_parser.add_argument("--lr", type=checked(float, "> 0"), default=None,
                             help=f"linear: SGD lr per 256 images (default: {eval_linear.LINEAR_LR:g}); dense: the "
                                  f"probe's AdamW lr (default: {eval_dense.DEFAULT_LR:g})")
    eval_parser.add_argument("--n-last-blocks", type=checked(int, ">= 1"), default=None,
                             help="linear: concatenate the CLS tokens of the last n blocks (default: DINO's, "
                                  "1 for vit_base, else 4); dense: their patch tokens (default: 1)")
    eval_parser.add_argument("--avgpool-patchtokens", action=argparse.BooleanOptionalAction, default=None,
                             help="linear: also the last block's mean patch token (default: DINO's, on for vit_base)")
    eval_parser.add_argument("--val-freq", type=checked(int, ">= 1"), default=1,
                             help="linear: validate every this many epochs, and after the last (default: 1)")
    eval_parser.add_argument("--fast", action="store_true",
                             help="linear: a logistic regression solved by L-BFGS on DINO's features of centre "
                                  "crops and their mirror images, computed once, instead of DINO's protocol "
                                  "(compare's linear score; numbers not comparable with DINO's)")
    eval_parser.add_argument("--num-classes", type=checked(int, f"[1, {eval_dense.NUM_LABELS}]"), default=None,
                             help="dense: classes 0..N-1 (default: 1 + the largest label in the train masks)")
    eval_parser.add_argument("--device", type=checked(str, ALLOWED["device"]), default="auto",
                             help="auto (CUDA when there is one), cpu, cuda or cuda:N (default: auto)")
    eval_parser.add_argument("--num-workers", type=checked(int, ">= -1"), default=-1,
                             help="loader processes; -1 = one per free core, less one for this process (default)")
    eval_parser.add_argument("--limit", type=checked(int, ">= 0"), default=None,
                             help="use at most this many images per split; 0 = all (default: all; "
                                  f"dense on built-in data on a CPU: {eval_dense.BUILTIN_CPU_LIMIT})")
    eval_parser.set_defaults(handler=run_eval, parser=eval_parser)


def _add_compare_parser(commands):
    compare_parser = commands.add_parser(
        "compare", help="ADCLR against DINO (lambda 0) and random init at equal budget, over seeds",
        usage="adclr compare [--seeds S ...] [--eval-images N] [any adclr train --flag VALUE ...]")
    compare_parser.add_argument("--seeds", type=checked(int, ALLOWED["seed"]), nargs="+", default=[0, 1, 2],
                                help="one ADCLR and one DINO run per seed (default: 0 1 2)")
    compare_parser.add_argument("--methods", nargs="+", choices=compare.LABELS, default=list(compare.METHODS[1:]),
                                help="what to train and score beside random init (default: dino adclr)")
    compare_parser.add_argument("--eval-images", type=checked(int, ">= 1"), default=None,
                                help=f"images per split for k-NN, linear and dense (default: {compare.EVAL_IMAGES})")
    add_config_flags(compare_parser, compare.PRESET, hidden=("seed", "method"),
                     helps={"out": "folder of the comparison: compare.md, compare.json, and a run folder per "
                                   "method and seed"})
    compare_parser.set_defaults(handler=run_compare, parser=compare_parser)


def vary(text):
    """An argparse `type` for --vary KEY=V1,V2,...: (Config field, [values]), each value
    parsed and range-checked as its adclr train flag is."""
    key, sep, values = text.partition("=")
    field = key.replace("-", "_")
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    if not sep or not values or field not in fields:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,... with KEY an adclr train flag, got {text!r}")
    if isinstance(fields[field], (tuple, bool)) or field in ("out", "seed", "method"):
        raise argparse.ArgumentTypeError(f"--{key} cannot be swept")
    parse = checked(type(fields[field]), ALLOWED.get(field))
    try:
        parsed = [parse(value) for value in values.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(f"{key}: {error}") from None
    twice = [v for i, v in enumerate(parsed) if v in parsed[:i]]
    if twice:  # the same point, trained and scored twice
        raise argparse.ArgumentTypeError(f"{key}: {twice[0]} is given twice")
    return field, parsed


def _add_sweep_parser(commands):
    grid = " ".join(f"{k.replace('_', '-')}={','.join(map(str, v))}" for k, v in compare.SWEEP.items())
    sweep_parser = commands.add_parser(
        "sweep", help="compare's settings tried for both methods alike, scored on a held-out split",
        usage="adclr sweep [--vary KEY=V1,V2 ...] [--one-at-a-time] [--seeds S ...] [--eval-images N] "
              "[any adclr train --flag VALUE ...]")
    sweep_parser.add_argument("--vary", type=vary, action="append", default=None, metavar="KEY=V1,V2",
                              help=f"an adclr train flag and its values; the grid is the product of every --vary "
                                   f"(default: {grid})")
    sweep_parser.add_argument("--one-at-a-time", action="store_true",
                              help="instead of every combination: the first value of every --vary (the base), "
                                   "then each other value alone with the rest at the base")
    sweep_parser.add_argument("--seeds", type=checked(int, ALLOWED["seed"]), nargs="+", default=[0],
                              help="one ADCLR and one DINO run per seed and grid point (default: 0)")
    sweep_parser.add_argument("--eval-images", type=checked(int, ">= 1"), default=None,
                              help=f"images per split for k-NN, linear and dense (default: {compare.EVAL_IMAGES})")
    swept = {k: f"{compare.PRESET.get(k, getattr(Config, k))}; without --vary swept over {','.join(map(str, v))}"
             for k, v in compare.SWEEP.items()}
    add_config_flags(sweep_parser, {**compare.PRESET, "out": "runs/sweep", **swept}, hidden=("seed", "method"),
                     helps={"out": "folder of the sweep: sweep.md, sweep.json, and a comparison's folder per "
                                   "grid point"})
    sweep_parser.set_defaults(handler=run_sweep, parser=sweep_parser)


def _add_show_parser(commands):
    show_parser = commands.add_parser("show", help="pictures: attention maps, dense predictions, training curves "
                                                   "(needs matplotlib: pip install 'adclr[viz]')")
    pictures = show_parser.add_subparsers(dest="picture", required=True)
    attention = pictures.add_parser("attention", help="the last block's attention, CLS and each query token "
                                                      "to the patches, per head and averaged")
    dense = pictures.add_parser("dense", help="the dense probe's predicted masks beside the ground truth")
    for picture in (attention, dense):
        picture.add_argument("--checkpoint", required=True, help="OUT/checkpoint.pt of a run")
        picture.add_argument("--data", default=None,
                             help="built-in set or folder (attention: any images; dense: as for eval dense); "
                                  "default: the run's data (dense: as for eval dense)")
        picture.add_argument("--images", type=checked(int, ">= 1"), default=4, help="how many images (default: 4)")
        picture.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                                help="which network's backbone (default: teacher)")
        picture.add_argument("--out", default=None, help="folder for the PNGs (default: pictures/ beside the checkpoint)")
    attention.add_argument("--num-queries", type=checked(int, ">= 0"), default=None,
                           help="query crops per image (default: the run's --num-queries)")
    attention.add_argument("--seed", type=checked(int, ">= 0"), default=0, help="where the query crops fall")
    dense.add_argument("--limit", type=checked(int, ">= 0"), default=None,
                       help="train images for the probe; 0 = all (default: all; built-in data: "
                            f"{eval_dense.BUILTIN_CPU_LIMIT})")
    dense.add_argument("--num-workers", type=checked(int, ">= -1"), default=-1,
                       help="loader processes; -1 = one per free core, less one for this process (default)")
    curves = pictures.add_parser("curves", help="losses, lr, teacher temperature (and k-NN if logged) "
                                                "from a run's metrics.jsonl, written beside it as metrics.png")
    curves.add_argument("run", help="a run folder (adclr train --out) or its metrics.jsonl")
    show_parser.set_defaults(handler=run_show, parser=show_parser)
    for picture in (attention, dense, curves):  # errors name the picture's flags and usage
        picture.set_defaults(parser=picture)


def main(argv=None):
    """Run a command. What a user must fix ends in one "error:" line (exit 1), Ctrl-C, once
    a job has kept what it can, in the shell's 130; neither in a traceback."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its usage
        args.parser.error(_unrecognized(args.parser, unknown))
    if args.command != "train" and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        # Each process would run the whole job, on one device, and write the same files.
        args.parser.error(f"adclr {args.command} runs in one process: run it without torchrun, or unset "
                          "WORLD_SIZE (only adclr train is distributed)")
    try:
        args.handler(args)
    except KeyboardInterrupt:
        # What could be saved is saved: another Ctrl-C while the interpreter shuts down
        # (the loader's workers, the weakref callbacks) stops at once, as the signal's own
        # default, instead of printing tracebacks from wherever it lands. Only for the
        # command line's own process (argv read from it): a caller's keeps its handler.
        if argv is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise SystemExit(130)
    except WriteError as error:  # a full disk, a file the system will not let us replace
        raise SystemExit(f"error: {error}")


def _flags(args, *leave_out):
    """The Config flags given on the command line (their defaults are suppressed), as {field: value}."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "handler", "parser", *leave_out)}


def _run_job(job, *job_args, **job_kwargs):
    """Run a training job as a command and return what it returns: a diverged run ends with
    one line (exit 1), and Ctrl-C (after the job has kept what it can) with the shell's 130,
    not a traceback."""
    try:
        return job(*job_args, **job_kwargs)
    except FloatingPointError as error:
        raise SystemExit(f"error: {error}")


# The training flags that only some methods' losses read (docs/methods.md). The crop counts
# are not among them: they decide what the loader cuts, for every method.
METHOD_FLAGS = {"lambda_query": "adclr", "query_sees_prefix": "adclr", "query_sees_self": "adclr",
                "query_sees_queries": "adclr", "lambda_dense": "densecl", "mask_ratio": "ccmim",
                "lambda_align": "ccmim"}


def run_train(args):
    given = _flags(args)
    cfg, demo = make_config(given)
    errors = config_errors(cfg)  # what depends on several flags; before any work
    if errors:
        args.parser.error(f"argument {errors[0]}")
    # Said, not refused: a run that was started with one resumes with the same command.
    ignored = [f"--{flag.replace('_', '-')}" for flag, method in METHOD_FLAGS.items()
               if flag in given and cfg.method != method]
    if ignored and os.environ.get("RANK", "0") == "0":
        print(f"note: {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with "
              f"--method {cfg.method} (docs/methods.md)", file=sys.stderr)
    step = _run_job(train.train, cfg)  # the step of the checkpoint the run leaves in --out
    # The demo's last line, did it learn: on the built-in sets, which have labels.
    if step and demo and cfg.data in ("", *BUILTIN) and int(os.environ.get("RANK", "0")) == 0:
        images = eval_knn.DEMO_IMAGES
        print(f"k-NN of the teacher and of the network at random init on {images} images per split ...",
              file=sys.stderr, flush=True)
        try:
            trained, at_init = eval_knn.knn_trained_and_at_init(cfg, images)
        except KeyboardInterrupt:
            checkpoint = shlex.quote(os.path.join(cfg.out, "checkpoint.pt"))
            print(f"interrupted: the k-NN check stopped; the run is complete in {cfg.out} "
                  f"(adclr eval knn --checkpoint {checkpoint} evaluates it)", file=sys.stderr)
            raise
        print(f"k-NN accuracy (k = 20, {images} train / {images} val images of "
              f"{cfg.data or 'builtin'}): teacher {100 * trained:.1f}%, the same network at random init "
              f"{100 * at_init:.1f}%", file=sys.stderr)


# The eval flags that only some protocols read: given to another, they would be ignored.
EVAL_FLAGS_OF = {"k": ("knn",), "temperature": ("knn",), "fast": ("linear",), "val_freq": ("linear",),
                 "avgpool_patchtokens": ("linear",), "epochs": ("linear", "dense"), "lr": ("linear", "dense"),
                 "n_last_blocks": ("linear", "dense"), "num_classes": ("dense",)}


def run_eval(args):
    for dest, protocols in EVAL_FLAGS_OF.items():
        if args.protocol not in protocols and getattr(args, dest) != args.parser.get_default(dest):
            args.parser.error(f"argument --{dest.replace('_', '-')}: applies to eval "
                              f"{' and '.join(protocols)}, not eval {args.protocol}")
    if args.protocol == "linear" and args.fast:
        for dest in ("lr", "val_freq"):  # the fast probe is L-BFGS: no learning rate, one score
            if getattr(args, dest) != args.parser.get_default(dest):
                args.parser.error(f"argument --{dest.replace('_', '-')}: applies to eval linear's "
                                  "SGD probe, not --fast")
    common = dict(data=args.data, weights=args.weights, image_size=args.image_size, batch_size=args.batch_size,
                  device=args.device, num_workers=args.num_workers)
    if args.protocol == "dense":
        result = eval_dense.evaluate_dense(args.checkpoint, **common, n_last_blocks=args.n_last_blocks,
                                           epochs=args.epochs, lr=args.lr, num_classes=args.num_classes,
                                           limit=args.limit)
    elif args.protocol == "knn":
        result = eval_knn.evaluate_knn(args.checkpoint, **common, ks=args.k, temperature=args.temperature,
                                       limit=args.limit or 0)
    else:
        result = eval_linear.evaluate_linear(
            args.checkpoint, **common, epochs=args.epochs, limit=args.limit or 0, fast=args.fast,
            n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens,
            lr=eval_linear.LINEAR_LR if args.lr is None else args.lr, val_freq=args.val_freq)
    print(json.dumps(result))


def run_compare(args):
    given = {k: tuple(v) if isinstance(v, list) else v
             for k, v in _flags(args, "seeds", "eval_images", "methods").items()}
    if "seed" in given:
        args.parser.error("argument --seed: adclr compare takes --seeds")
    if "method" in given:  # each run has its own
        args.parser.error("argument --method: adclr compare takes --methods")
    cfg = Config(**{**compare.PRESET, **given})
    errors = config_errors(cfg)
    if errors:
        args.parser.error(f"argument {errors[0]}")
    _run_job(compare.compare, cfg, args.seeds, eval_images=args.eval_images or compare.EVAL_IMAGES,
             methods=args.methods)


def run_sweep(args):
    given = {k: tuple(v) if isinstance(v, list) else v
             for k, v in _flags(args, "seeds", "eval_images", "vary", "one_at_a_time").items()}
    if "seed" in given:
        args.parser.error("argument --seed: adclr sweep takes --seeds")
    if "method" in given:  # it sweeps ADCLR and DINO alike
        args.parser.error("argument --method: adclr sweep runs ADCLR and DINO, each with its own")
    grid = dict(args.vary or compare.SWEEP.items())
    if args.vary and len(grid) < len(args.vary):
        args.parser.error("argument --vary: a flag is given twice; list all its values in one --vary")
    clash = [key for key in grid if key in given]
    if clash:
        flag = "--" + clash[0].replace("_", "-")
        args.parser.error(f"argument --vary: {flag} is swept, so it cannot also be set by {flag}")
    cfg = Config(**{**compare.PRESET, "out": "runs/sweep", **given})
    errors = config_errors(cfg)
    if errors:
        args.parser.error(f"argument {errors[0]}")
    _run_job(compare.sweep, cfg, grid, args.seeds, eval_images=args.eval_images or compare.EVAL_IMAGES,
             one_at_a_time=args.one_at_a_time)


def run_show(args):
    if args.picture == "attention":
        paths = show.show_attention(args.checkpoint, data=args.data, images=args.images,
                                    num_queries=args.num_queries, weights=args.weights, out=args.out,
                                    seed=args.seed)
    elif args.picture == "dense":
        paths = [show.show_dense(args.checkpoint, data=args.data, images=args.images, weights=args.weights,
                                 out=args.out, limit=args.limit, num_workers=args.num_workers)]
    else:
        paths = [show.show_curves(args.run)]
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps({"picture": args.picture, "files": paths}))


def run_export(args):
    export.export(args.checkpoint, args.out, args.weights)
    print(json.dumps({"exported": args.out, "weights": args.weights}))


if __name__ == "__main__":
    main()
