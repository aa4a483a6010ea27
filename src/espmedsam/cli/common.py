"""What every verb shares: the app and its command groups, one-line errors, shared options, progress."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from espmedsam.backends import choose_backend, is_exported
from espmedsam.errors import ConfigError, EspMedSAMError, InputError

console = Console(stderr=True)


_state = {"debug": False}
SILENT_RANK_GRACE_SECONDS = 30.0  # how long a rank that does not report a config error waits for rank 0


class _App(typer.Typer):
    """Typer app that turns library errors into ``error: <message>`` and the error's exit code."""

    def __call__(self, *args, **kwargs):
        try:
            # not standalone: usage errors come here as exceptions, so they too can be one line
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # an unknown option, a bad value, a missing argument
            _usage_error(error)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        except EspMedSAMError as error:
            if _state["debug"]:
                raise
            # under torchrun every rank reads the same config: rank 0 alone reports its errors
            if is_main_process() or not isinstance(error, ConfigError):
                _print_error(str(error))
            else:
                # torchrun stops every rank as soon as one exits: the others wait, so that rank 0 is
                # not stopped before it has said what is wrong
                time.sleep(SILENT_RANK_GRACE_SECONDS)
            sys.exit(error.exit_code)
        except OSError as error:  # a failed read or write that no library code named: still one line
            if _state["debug"]:
                raise
            message, code = _os_error(error)
            _print_error(message)
            sys.exit(code)
        if isinstance(code, int) and code:  # typer.Exit(N) and Ctrl-C (130) return their code here
            sys.exit(code)
        return code


def _usage_error(error: typer.TyperException) -> None:
    """``error: <message> (see <command> --help)`` and the usage exit code; help text as it is."""
    message = error.format_message()
    context = getattr(error, "ctx", None)
    if "\n" in message.strip():  # a command group called without a command: its help
        console.print(message, highlight=False, markup=False)
    else:
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        _print_error(f"{message}{hint}")
    sys.exit(error.exit_code)


def is_main_process() -> bool:
    """Rank 0 under torchrun (its RANK; no torch import), or a process started without it."""

    return os.environ.get("RANK", "0") == "0"


def _print_error(message: str) -> None:
    from rich.markup import escape

    # escaped: a "[...]" in a file name or message is text, not rich markup
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def _os_error(error: OSError) -> tuple[str, int]:
    """The one line and exit code of an OSError: ``cannot write FILE: REASON`` (the output error's code)
    for a full or read-only disk, else ``FILE: REASON`` and 1."""
    import errno

    from espmedsam.errors import OutputError

    reason = error.strerror or str(error) or type(error).__name__
    where = f"{error.filename}: " if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return f"cannot write {where}{reason}", OutputError.exit_code
    return f"{where}{reason}", 1


app = _App(
    name="espmedsam",
    help="ESP-MedSAM: prompt-free segmentation of 2D medical images (six modalities).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


import_app = typer.Typer(
    help="Convert checkpoints from the field (official ESP-MedSAM, LiteMedSAM, MobileSAM, SAM)."
)


app.add_typer(import_app, name="import")


data_app = typer.Typer(help="Dataset folders: validate them; convert public layouts into them.")


app.add_typer(data_app, name="data")


distill_app = typer.Typer(
    help="MMDKD: distil a SAM ViT teacher into the shared encoder (common) or into controllers (modality)."
)


app.add_typer(distill_app, name="distill")


classifier_app = typer.Typer(help="The modality classifier behind --modality auto.")


app.add_typer(classifier_app, name="classifier")


modality_app = typer.Typer(help="A checkpoint's modalities: remove or rename one (add-modality adds one).")


app.add_typer(modality_app, name="modality")


quality_app = typer.Typer(help="The quality score of prompt-free masks: their predicted Dice.")


app.add_typer(quality_app, name="quality")


prompts_app = typer.Typer(help="The prompt path: train the click decoder that corrects a mask with clicks.")


app.add_typer(prompts_app, name="prompts")


predictions_app = typer.Typer(help="Tables predict wrote: join the parts of a spread run.")


app.add_typer(predictions_app, name="predictions")


DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (a CUDA GPU when present, else the CPU), cpu, cuda or cuda:N.")
]


TeacherOpt = Annotated[
    Path, typer.Option("--teacher", "-t", help="SAM ViT-B/L/H / MedSAM .pth or imported teacher.")
]


RecipeOpt = Annotated[
    str | None, typer.Option("--config", help="YAML recipe or shipped name (mmdkd_cpu_256).")
]


OverridesOpt = Annotated[
    list[str] | None, typer.Option("--set", help="key=value config override, e.g. epochs=5 (repeatable).")
]


DistillOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: out_dir).")]


SamplesOpt = Annotated[
    int, typer.Option("--samples-per-modality", help="Embeddings per modality (augmented variants).")
]


Fp16Opt = Annotated[bool, typer.Option("--fp16", help="Store floating tensors as float16.")]


RefineOpt = Annotated[
    str,
    typer.Option(
        "--refine",
        help="self: the model prompts itself with boxes around its own mask, on the modalities where the "
        "checkpoint's validation found it helps (espmedsam info lists them); none: prompt-free.",
    ),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", "-c", help="Native .safetensors checkpoint (default: bundled).")
]
ModelFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="Native .safetensors (default: bundled), or .onnx (espmedsam export --format onnx).",
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        help="torch (.safetensors); onnxruntime (an exported .onnx file); openvino (an exported .onnx "
        "file, or a .safetensors whose encoder and prompt-free decoders OpenVINO then runs, the rest in "
        "torch); auto: the "
        "fastest installed for the checkpoint (openvino, else onnxruntime, for .onnx; torch otherwise)."
    ),
]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(  # under torchrun only rank 0 logs progress details
        level=logging.INFO if verbose and is_main_process() else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def make_predictor(
    checkpoint,
    backend: str,
    device: str,
    size,
    bfloat16: bool,
    batch_size: int,
    threads,
    refine: str = "none",
    native_openvino: bool = False,
    max_graphs: int | None = 2,
):
    """The Predictor of a CLI verb; ``native_openvino``: ``auto`` may choose OpenVINO for a native
    checkpoint (``backends.choose_backend``); ``max_graphs``: OpenVINO's compiled input sides kept at
    once for an exported file, one fewer for a native checkpoint, whose torch model and quality score's
    decoder pass sit beside the graphs (a folder's run: two, which bounds its memory over many images of
    several sizes to 1.5 GB; a server: all, None)."""
    from espmedsam.models.espmedsam import ESPMedSAM
    from espmedsam.predict import Predictor

    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    choice = choose_backend(backend, checkpoint, native_openvino=native_openvino)
    if choice.notice:
        console.print(f"[yellow]--backend auto:[/yellow] {choice.notice}")
    if choice.name == "openvino" and not is_exported(checkpoint):
        from espmedsam.openvino_encoder import use_openvino_encoder

        model = load_or_build(checkpoint, "default")
        if isinstance(model, ESPMedSAM):
            native_graphs = None if max_graphs is None else max(1, max_graphs - 1)
            model = use_openvino_encoder(
                model, threads=threads, bfloat16=bfloat16, progress=_say, max_graphs=native_graphs
            )
        elif backend != "auto":
            raise InputError(f"--backend openvino runs ESP-MedSAM checkpoints, not a {type(model).__name__}")
    elif choice.name == "openvino":
        from espmedsam import openvino_backend

        model = openvino_backend.OpenVinoBackend(
            checkpoint, threads=threads, bfloat16=bfloat16, cache_dir=openvino_backend.CACHE_DIR,
            max_graphs=max_graphs,
        )  # fmt: skip
    elif choice.name == "onnxruntime":
        from espmedsam.onnx_backend import OnnxBackend

        model = OnnxBackend(checkpoint, threads=threads)
    else:
        model = load_or_build(checkpoint, "default")
    return Predictor(
        model, device=device, size=size, bfloat16=bfloat16, batch_size=batch_size, refine=refine_flag(refine)
    )


def _say(message: str) -> None:
    console.print(message, highlight=False)


def refine_flag(refine: str) -> bool:
    """``--refine none|self`` -> whether the model prompts itself. Raises InputError otherwise."""
    if refine not in ("none", "self"):
        raise InputError(f"--refine must be none or self, got {refine!r}")
    return refine == "self"


def load_or_build(checkpoint: Path | None, name: str):
    from espmedsam.checkpoints.native import default_checkpoint, load_checkpoint
    from espmedsam.models.registry import build_model

    path = checkpoint or (default_checkpoint() if name == "default" else None)
    if path is not None:
        return load_checkpoint(path)
    if name == "default":
        console.print("[yellow]warning:[/yellow] no trained weights bundled; using an untrained model")
    return build_model(name)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (console.is_terminal and is_main_process()),
    )
