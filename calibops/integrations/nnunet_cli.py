"""``calibops nnunet train|predict``: nnU-Net v2 training with the mL1-ACE trainers, and prediction with them.

    calibops nnunet train DATASET CONFIGURATION FOLD --binning hard|soft [--ace-weight W] [--num-bins M]
                          [--ace-deep-supervision full|all] [--epochs N] [--iterations-per-epoch N]
                          [--val-iterations-per-epoch N] [nnU-Net's nnUNetv2_train flags: -p, -pretrained_weights,
                          --npz, --c, --val, --val_best, --disable_checkpointing, -device]
    calibops nnunet predict -i IN -o OUT -d DATASET -c CONFIGURATION [-f FOLD ...] --binning hard|soft
                          [the same loss flags, or -tr TRAINER] [--save_probabilities] [nnU-Net's nnUNetv2_predict
                          flags: -p, -chk, -step_size, --disable_tta, --continue_prediction, -npp, -nps,
                          -prev_stage_predictions, -device, --disable_progress_bar, --verbose]

``train`` does what ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr <trainer>`` does (nnU-Net's own trainer code,
checkpointing, final validation), with the trainer class of :mod:`calibops.integrations.nnunet` constructed
directly: nnU-Net looks trainers up by name only inside its own package. ``predict`` does what
``nnUNetv2_predict`` does for a model trained that way (the network is rebuilt from the plans, as nnU-Net's
predictor does, and the folds' checkpoints are ensembled). nnU-Net's environment variables ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` say where the data and models are.

Opt-in, reversible: ``calibops nnunet install-trainers`` writes one small module,
``nnunetv2/training/nnUNetTrainer/calibops_trainers.py``, into the installed nnU-Net package. It only imports
``nnUNetTrainerHardL1ACE`` and ``nnUNetTrainerSoftL1ACE`` from calibops, so that nnU-Net's own commands find them
by name (``nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainerSoftL1ACE``, ``nnUNetv2_predict ... -tr
nnUNetTrainerSoftL1ACE``; the other loss options need ``calibops nnunet train``). ``calibops nnunet uninstall``
removes exactly that file (and its compiled cache), and refuses to touch a file it did not write. Reinstalling
nnunetv2 removes it as well.

Errors are one line, ``calibops nnunet: error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from typing import Any

from ..cli.errors import UsageError, UsageParser

__all__ = ["build_parser", "install_trainers", "main", "shim_path", "uninstall_trainers"]

PROG = "calibops nnunet"


def _add_loss_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the calibration term (defaults: the papers')")
    g.add_argument("--binning", choices=("hard", "soft"), default=None, help="hard or soft binned mL1-ACE (required)")
    g.add_argument("--ace-weight", type=float, default=1.0, help="weight of mL1-ACE next to Dice and CE (1.0)")
    g.add_argument(
        "--num-bins", type=int, default=20, help="confidence bins of mL1-ACE and the validation metrics (20)"
    )
    g.add_argument(
        "--ace-deep-supervision",
        choices=("full", "all"),
        default="full",
        help="full: the calibration term on the full-resolution output only (default); all: on every deep "
        "supervision output nnU-Net's loss uses, with nnU-Net's weights",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``calibops nnunet`` and its subcommands."""
    top = UsageParser(
        prog=PROG,
        description="nnU-Net v2 with the mL1-ACE calibration loss: train and predict with the calibops trainers "
        "(needs pip install 'calibops[nnunet]'; see docs/integrations.md).",
    )
    sub = top.add_subparsers(dest="action", metavar="ACTION")

    t = sub.add_parser(
        "train",
        help="nnUNetv2_train with nnU-Net's loss + mL1-ACE",
        description="Train nnU-Net (its own trainer code) with Dice + CE + mL1-ACE and log validation ECE/ACE/MCE "
        "next to the pseudo-Dice. The output folder is nnU-Net's: "
        "$nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>/fold_<fold>, where <trainer> is "
        "nnUNetTrainerHardL1ACE or nnUNetTrainerSoftL1ACE plus a suffix for every non-default loss option.",
    )
    t.add_argument("dataset_name_or_id", help="dataset name (DatasetXXX_Name) or id")
    t.add_argument("configuration", help="nnU-Net configuration, e.g. 2d or 3d_fullres")
    t.add_argument("fold", help="fold of the 5-fold cross-validation (0-4) or 'all'")
    _add_loss_options(t)
    g = t.add_argument_group("training length (for short runs; default: nnU-Net's 1000 x 250, 50 validation)")
    g.add_argument("--epochs", type=int, default=None, help="number of epochs")
    g.add_argument("--iterations-per-epoch", type=int, default=None, help="training iterations per epoch")
    g.add_argument("--val-iterations-per-epoch", type=int, default=None, help="validation iterations per epoch")
    g = t.add_argument_group("nnUNetv2_train's flags (same meaning)")
    g.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    g.add_argument("-pretrained_weights", default=None, help="checkpoint to initialise the network from")
    g.add_argument("-num_gpus", type=int, default=1, help="only 1 (multi-GPU training is not supported here)")
    g.add_argument("--npz", action="store_true", help="save the final validation's probabilities (.npz)")
    g.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    g.add_argument("--val", action="store_true", help="only run the final validation (training must be finished)")
    g.add_argument("--val_best", action="store_true", help="final validation with checkpoint_best.pth")
    g.add_argument("--disable_checkpointing", action="store_true", help="write no checkpoint")
    g.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="device (default: cuda)")

    pr = sub.add_parser(
        "predict",
        help="nnUNetv2_predict for a model trained with calibops nnunet train",
        description="Predict with a model trained by calibops nnunet train (nnU-Net's predictor; the folds are "
        "ensembled). --save_probabilities writes the .npz that calibops evaluate reads.",
    )
    pr.add_argument("-i", required=True, help="input folder (nnU-Net raw format: CASE_0000.nii.gz ...)")
    pr.add_argument("-o", required=True, help="output folder (created if missing)")
    pr.add_argument("-d", required=True, help="dataset name or id")
    pr.add_argument("-c", required=True, help="configuration")
    pr.add_argument("-f", nargs="+", default=None, help="folds to ensemble (default: every fold with a checkpoint)")
    _add_loss_options(pr)
    pr.add_argument("-tr", default=None, help="trainer name instead of the loss flags (the output folder's prefix)")
    g = pr.add_argument_group("nnUNetv2_predict's flags (same meaning)")
    g.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    g.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    g.add_argument("-step_size", type=float, default=0.5, help="sliding window step (default: 0.5)")
    g.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    g.add_argument("--save_probabilities", action="store_true", help="also write CASE.npz (probabilities) + .pkl")
    g.add_argument("--continue_prediction", action="store_true", help="skip cases already predicted")
    g.add_argument("-npp", type=int, default=3, help="preprocessing processes (0 with -nps 0: sequential)")
    g.add_argument("-nps", type=int, default=3, help="export processes (0 with -npp 0: sequential)")
    g.add_argument("-prev_stage_predictions", default=None, help="previous stage's predictions (cascade)")
    g.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="device (default: cuda)")
    g.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    g.add_argument("--verbose", action="store_true", help="nnU-Net's verbose output")

    sub.add_parser(
        "install-trainers",
        help="opt-in: let nnUNetv2_train/-predict find -tr nnUNetTrainerHardL1ACE / nnUNetTrainerSoftL1ACE",
        description="Write one module, calibops_trainers.py, into the installed nnunetv2's trainer folder; it "
        "imports the two calibops trainers so that nnU-Net's commands find them by name. Reversible: "
        "calibops nnunet uninstall.",
    )
    sub.add_parser(
        "uninstall",
        help="remove the module install-trainers wrote",
        description="Remove calibops_trainers.py from nnunetv2's trainer folder (only if calibops wrote it).",
    )
    return top


SHIM_NAME = "calibops_trainers.py"
SHIM_MARKER = "# written by `calibops nnunet install-trainers`; `calibops nnunet uninstall` removes it"
SHIM_TEXT = f"""{SHIM_MARKER}
# nnU-Net finds trainers by name inside its own package: this module makes the calibops trainers visible there.
from calibops.integrations.nnunet import nnUNetTrainerHardL1ACE, nnUNetTrainerSoftL1ACE  # noqa: F401
"""


def shim_path() -> str:
    """Where ``install-trainers`` writes its module: the installed nnunetv2's trainer folder."""
    import nnunetv2

    return os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer", SHIM_NAME)


def _ours(path: str) -> bool:
    try:
        with open(path) as f:
            return f.readline().rstrip("\n") == SHIM_MARKER
    except OSError:
        return False


def install_trainers(args: argparse.Namespace) -> int:
    """``calibops nnunet install-trainers``: write the shim module into nnU-Net's trainer folder."""
    path = shim_path()
    if os.path.exists(path) and not _ours(path):
        raise UsageError(f"{path} exists and was not written by calibops: not overwriting it")
    try:
        with open(path, "w") as f:
            f.write(SHIM_TEXT)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc} (is the nnunetv2 installation writable?)") from None
    print(
        f"calibops nnunet: wrote {path}\n"
        "  nnUNetv2_train / nnUNetv2_predict now find -tr nnUNetTrainerHardL1ACE and -tr nnUNetTrainerSoftL1ACE\n"
        "  undo with: calibops nnunet uninstall"
    )
    return 0


def uninstall_trainers(args: argparse.Namespace) -> int:
    """``calibops nnunet uninstall``: remove the shim module written by ``install-trainers`` (and its cache)."""
    path = shim_path()
    if not os.path.exists(path):
        print(f"calibops nnunet: nothing to remove ({path} does not exist)")
        return 0
    if not _ours(path):
        raise UsageError(f"{path} was not written by calibops: not removing it")
    try:
        os.remove(path)
        cache = os.path.join(os.path.dirname(path), "__pycache__")
        stem = SHIM_NAME[: -len(".py")] + "."
        for name in os.listdir(cache) if os.path.isdir(cache) else []:
            if name.startswith(stem):
                os.remove(os.path.join(cache, name))
    except OSError as exc:
        raise UsageError(f"cannot remove {path}: {exc}") from None
    print(f"calibops nnunet: removed {path}")
    return 0


def _device(name: str) -> Any:
    import torch

    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("-device cuda but no CUDA device is available: pass -device cpu")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        return torch.device("cuda")
    return torch.device("mps")


def _require_env(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise UsageError(
            f"nnU-Net's environment variable(s) {', '.join(missing)} not set: export them as for nnUNetv2_train "
            "(they name the raw, preprocessed and results folders)"
        )


def _fold(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"fold must be an integer or 'all', got {value!r}") from None


def _loss_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.binning is None:
        raise UsageError("--binning hard or --binning soft is required")
    return {
        "binning": args.binning,
        "ace_weight": args.ace_weight,
        "num_bins": args.num_bins,
        "ace_deep_supervision": args.ace_deep_supervision,
    }


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def train(args: argparse.Namespace) -> int:
    """``calibops nnunet train``: construct the calibops trainer as nnUNetv2_train would, train, validate."""
    opts = _loss_options(args)
    for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.num_gpus != 1:
        raise UsageError("-num_gpus: calibops nnunet train runs on one device (multi-GPU training is not supported)")
    if args.c and args.val:
        raise UsageError("--c and --val cannot be combined (as in nnUNetv2_train)")
    if args.val_best and args.disable_checkpointing:
        raise UsageError("--val_best needs checkpoints: drop --disable_checkpointing")
    _require_env("nnUNet_preprocessed", "nnUNet_results")
    fold = _fold(args.fold)
    device = _device(args.device)
    try:
        cls = _trainer_class(opts)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        dataset_name = maybe_convert_to_dataset_name(_dataset_id(args.dataset_name_or_id))
    except RuntimeError as exc:
        raise UsageError(f"dataset {args.dataset_name_or_id!r}: {exc}") from None
    folder = join(str(nnUNet_preprocessed), dataset_name)
    plans_file = join(folder, args.p + ".json")
    if not os.path.isfile(plans_file):
        raise UsageError(f"no plans {plans_file}: run nnUNetv2_plan_and_preprocess -d {args.dataset_name_or_id} first")
    plans = load_json(plans_file)
    if args.configuration not in plans.get("configurations", {}):
        known = ", ".join(plans.get("configurations", {}))
        raise UsageError(f"configuration {args.configuration!r} is not in {plans_file} (it has: {known})")
    plans["continue_training"] = args.c
    dataset_json = load_json(join(folder, "dataset.json"))
    trainer = cls(plans=plans, configuration=args.configuration, fold=fold, dataset_json=dataset_json, device=device)
    if args.epochs is not None:
        trainer.num_epochs = args.epochs
    if args.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = args.iterations_per_epoch
    if args.val_iterations_per_epoch is not None:
        trainer.num_val_iterations_per_epoch = args.val_iterations_per_epoch
    if args.disable_checkpointing:
        trainer.disable_checkpointing = True
    maybe_load_checkpoint(trainer, args.c, args.val, args.pretrained_weights)
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not args.val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(args.npz)
    print(f"calibops nnunet train: model in {trainer.output_folder_base}")
    return 0


def _dataset_id(value: str) -> int | str:
    if value.startswith("Dataset"):
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"dataset must be a name DatasetXXX_Name or an integer id, got {value!r}") from None


def _trainer_class(opts: dict[str, Any]) -> type:
    from . import nnunet

    return nnunet.trainer_class(**opts)


def predict(args: argparse.Namespace) -> int:
    """``calibops nnunet predict``: nnU-Net's predictor on the folds of a calibops-trained model."""
    _require_env("nnUNet_results")
    if args.tr is None:
        from . import nnunet

        try:
            trainer_name = nnunet.trainer_name(**_loss_options(args))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        trainer_name = args.tr
    if not 0 < args.step_size <= 1:
        raise UsageError(f"-step_size must be in (0, 1], got {args.step_size}")
    if not os.path.isdir(args.i):
        raise UsageError(f"-i {args.i!r} is not a directory")
    device = _device(args.device)

    import inspect

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from .nnunet import nnUNetTrainerL1ACE

    try:
        model = get_output_folder(_dataset_id(args.d), trainer_name, args.p, args.c)
    except RuntimeError as exc:
        raise UsageError(f"dataset {args.d!r}: {exc}") from None
    if not os.path.isdir(model):
        raise UsageError(f"no trained model {model}: train it with calibops nnunet train (same loss flags)")
    folds = [_fold(f) for f in args.f] if args.f else nnUNetPredictor.auto_detect_available_folds(model, args.chk)
    if not folds:
        raise UsageError(f"no fold folder of {model} holds {args.chk}")
    dataset_json = load_json(join(model, "dataset.json"))
    plans_manager = PlansManager(load_json(join(model, "plans.json")))
    parameters, mirroring, configuration = [], None, None
    for i, f in enumerate(folds):
        path = join(model, f"fold_{f}", args.chk)
        if not os.path.isfile(path):
            raise UsageError(f"no checkpoint {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if i == 0:
            configuration = ckpt["init_args"]["configuration"]
            mirroring = ckpt.get("inference_allowed_mirroring_axes")
        parameters.append(ckpt["network_weights"])
    cm = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, cm, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    # the calibops trainers keep nnU-Net's architecture: nnUNetTrainer's builder (new signature) rebuilds it
    assert "plans_manager" in inspect.signature(nnUNetTrainerL1ACE.build_network_architecture).parameters
    network = nnUNetTrainerL1ACE.build_network_architecture(
        plans_manager, cm, num_inputs, num_outputs, enable_deep_supervision=False
    )
    network.load_state_dict(parameters[0])
    predictor = nnUNetPredictor(
        tile_step_size=args.step_size,
        use_gaussian=True,
        use_mirroring=not args.disable_tta,
        perform_everything_on_device=True,
        device=device,
        verbose=args.verbose,
        verbose_preprocessing=args.verbose,
        allow_tqdm=not args.disable_progress_bar,
    )
    predictor.manual_initialization(network, plans_manager, cm, parameters, dataset_json, trainer_name, mirroring)
    os.makedirs(args.o, exist_ok=True)
    if args.npp == 0 and args.nps == 0:
        predictor.predict_from_files_sequential(
            args.i,
            args.o,
            save_probabilities=args.save_probabilities,
            overwrite=not args.continue_prediction,
            folder_with_segs_from_prev_stage=args.prev_stage_predictions,
        )
    else:
        predictor.predict_from_files(
            args.i,
            args.o,
            save_probabilities=args.save_probabilities,
            overwrite=not args.continue_prediction,
            num_processes_preprocessing=max(args.npp, 1),
            num_processes_segmentation_export=max(args.nps, 1),
            folder_with_segs_from_prev_stage=args.prev_stage_predictions,
        )
    print(f"calibops nnunet predict: predictions in {args.o}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``calibops nnunet``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if args.action is None:
            parser.print_help()
            return 2
        try:
            import nnunetv2  # noqa: F401
        except ImportError:
            raise UsageError(
                "nnU-Net v2 is not installed: pip install 'calibops[nnunet]' (on a CPU-only machine see "
                "docs/integrations.md: keep torch pinned and remove torchvision/timm afterwards)"
            ) from None
        actions = {"train": train, "predict": predict, "install-trainers": install_trainers}
        return actions.get(args.action, uninstall_trainers)(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
