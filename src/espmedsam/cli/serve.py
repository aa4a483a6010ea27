"""The web page and API: serve."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from espmedsam.cli.common import (
    CheckpointOpt,
    DeviceOpt,
    app,
    console,
    make_predictor,
)
from espmedsam.errors import InputError


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 lets other machines reach the page.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    checkpoint: CheckpointOpt = None,
    backend: Annotated[
        str,
        typer.Option(
            help="torch; openvino: the encoder, the prompt-free decoders and the classifier's encoder "
            "compiled by OpenVINO (twice as fast on a CPU, more memory; exported once per checkpoint at "
            "the first start, about two minutes, then cached), the promptable decoder in torch; auto: "
            "openvino where it is installed, else torch."
        ),
    ] = "auto",
    device: DeviceOpt = "auto",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for the model (default: all cores).")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted, in MB.")] = 64,
    max_pixels: Annotated[
        int, typer.Option(help="Largest image accepted (width x height of one frame).")
    ] = 36_000_000,
    max_frames: Annotated[int, typer.Option(help="Most slices of a volume accepted.")] = 512,
    fp32: Annotated[bool, typer.Option("--fp32", help="Disable bfloat16 autocast.")] = False,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's: critical, error, warning, info, debug.")
    ] = "info",
    workers: Annotated[
        int,
        typer.Option(
            help="Model processes behind the one port, each with its own model and --threads "
            "(default: cores / workers): more than one core's worth of requests at once.",
            min=1,
        ),
    ] = 1,
) -> None:
    """Start the web page and its JSON API (OpenAPI at /docs): upload images or volumes, see and download
    their masks. One model, loaded once per worker, serves every request; uploads live in a temporary
    folder."""

    try:
        from espmedsam.serve.app import create_app
        from espmedsam.serve.server import LOOPBACK, bind, serve_forever, serve_workers, url_of
        from espmedsam.serve.uploads import UploadLimits
    except ModuleNotFoundError as error:
        from espmedsam.errors import MissingDependencyError

        raise MissingDependencyError(f"serve needs {error.name}; pip install 'espmedsam[serve]'") from None
    if max_upload_mb <= 0 or max_pixels < 1 or max_frames < 1:
        raise InputError("--max-upload-mb, --max-pixels and --max-frames must be positive")
    if checkpoint is not None and checkpoint.suffix.lower() == ".onnx":
        raise InputError("serve runs native checkpoints (.safetensors); it has no ONNX backend")
    if backend not in ("auto", "torch", "openvino"):
        raise InputError(f"serve --backend must be auto, torch or openvino, got {backend!r}")
    limits = UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, max_frames=max_frames)
    sock = bind(host, port)  # before the model loads: a taken port is said at once
    name = checkpoint.name if checkpoint else "bundled default weights"
    if workers > 1 and checkpoint is not None and not checkpoint.is_file():
        from espmedsam.errors import CheckpointError

        raise CheckpointError(f"{checkpoint}: no such checkpoint file")  # said once, not by each worker
    if workers > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)

    def make_app():
        predictor = make_predictor(
            checkpoint, backend, device, None, not fp32, 8, threads, native_openvino=True, max_graphs=None
        )
        encoder = getattr(predictor.model, "image_encoder", None)
        if hasattr(encoder, "prepare"):  # OpenVINO: export and compile now, not at the first upload
            encoder.prepare([predictor.input_size(modality) for modality in predictor.modalities])
        return create_app(predictor, limits=limits, checkpoint_name=name)

    if workers == 1:
        app_ = make_app()
    url = url_of(sock)
    console.print(
        f"espmedsam serve: [bold]{url}[/bold] (API docs {url}/docs); Ctrl+C stops it", highlight=False
    )
    if host not in LOOPBACK:
        console.print(
            "[yellow]warning:[/yellow] listening beyond this machine: anyone who can reach it can upload"
        )
    if workers == 1:
        serve_forever(app_, sock, log_level)
    else:
        console.print(f"{workers} workers of {threads} thread(s) each, loading their models")
        serve_workers(make_app, sock, workers, log_level)
