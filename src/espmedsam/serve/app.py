"""The web app: the page at ``/``, its JSON API under ``/api`` (OpenAPI at ``/docs``), one shared model.

``create_app(predictor)`` builds it; ``espmedsam serve`` runs it with uvicorn. Every asset the page needs is
in ``static/`` and served from here, and so are the API docs' (fastapi-offline): both work with no network
beyond this server.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.formparsers import MultiPartParser

from espmedsam import __version__
from espmedsam.errors import DataError, EspMedSAMError, InputError, MissingDependencyError
from espmedsam.predict import Predictor
from espmedsam.prompting import Prompts
from espmedsam.serve.limits import BodySizeLimit
from espmedsam.serve.schema import (
    ErrorBody,
    Health,
    Info,
    PromptRequest,
    PromptResult,
    QualityRequest,
    QualityResult,
    SegmentResult,
    correction_of,
    info_of,
    quality_of,
    result_of,
)  # fmt: skip
from espmedsam.serve.segmenter import Segmenter
from espmedsam.serve.uploads import UnsupportedFormat, UploadLimits, UploadTooLarge, display_name

STATIC_DIR = Path(__file__).parent / "static"
STATUS_OF_ERROR = (  # the first matching class decides
    (UploadTooLarge, 413),
    (UnsupportedFormat, 415),
    (MissingDependencyError, 501),
    (InputError, 422),
    (DataError, 400),
    (EspMedSAMError, 400),
)
ERROR_RESPONSES = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "an unreadable file"),
        (413, "an upload or image over the server's limits"),
        (415, "a file that is not PNG, JPEG, TIFF, BMP, GIF, DICOM or NIfTI"),
        (422, "an unknown modality, or a missing file field"),
    )
}
log = logging.getLogger("espmedsam.serve")


def create_app(
    predictor: Predictor,
    *,
    limits: UploadLimits | None = None,
    checkpoint_name: str = "",
    workspace: Path | None = None,
) -> FastAPI:
    """The web app around one loaded ``predictor``.

    Args:
        limits: upload and image caps (``UploadLimits()`` by default).
        checkpoint_name: shown by ``/api/info``.
        workspace: where uploads are written while they are read; default: a new temporary folder,
            removed when the app shuts down.
    """
    limits = limits or UploadLimits()
    body_cap = limits.max_bytes + 2**16  # the upload and the form's own bytes around it
    # Uploads stay in memory (they are capped) instead of spilling into the system temporary folder:
    # the only file a request writes is its own, in the workspace.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, body_cap)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = workspace is None
        folder = Path(tempfile.mkdtemp(prefix="espmedsam-serve-")) if own else Path(workspace)
        app.state.segmenter = Segmenter(predictor, folder, limits)
        try:
            yield
        finally:
            if own:
                shutil.rmtree(folder, ignore_errors=True)

    app = FastAPIOffline(  # FastAPI whose /docs page is served from here too, not from a CDN
        title="espmedsam",
        version=__version__,
        summary="ESP-MedSAM: prompt-free segmentation of 2D medical images of six modalities",
        lifespan=lifespan,
    )
    detail = f"upload over this server's limit of {limits.max_bytes / 2**20:g} MB"
    app.add_middleware(BodySizeLimit, max_bytes=body_cap, detail=detail)
    app.state.started = time.time()
    app.state.info = info_of(predictor, checkpoint_name, limits)
    _add_routes(app)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/health", response_model=Health, summary="Is the model loaded")
    def health() -> dict:
        info = app.state.info
        return {
            "status": "ok",
            "version": __version__,
            "modalities": info["modalities"],
            "uptime_s": round(time.time() - app.state.started, 1),
        }

    @app.get("/api/info", response_model=Info, summary="The model's configuration and parameter counts")
    def info() -> dict:
        return app.state.info

    @app.post(
        "/api/segment",
        response_model=SegmentResult,
        responses=ERROR_RESPONSES,
        summary="Segment one uploaded image or volume",
    )
    def segment(
        file: Annotated[
            UploadFile, File(description="PNG, JPEG, TIFF, BMP, GIF, DICOM or NIfTI (.nii, .nii.gz)")
        ],
        modality: Annotated[
            str, Form(description="a modality of /api/info, or auto (the classifier)")
        ] = "auto",
        details: Annotated[
            bool, Form(description="also each frame as PNG and its SPPG patch map (what the page shows)")
        ] = False,
        quality_later: Annotated[
            bool,
            Form(
                description="leave a single image's quality score for POST /api/quality, so the mask "
                "comes back sooner (quality_pending says when it was left)"
            ),
        ] = False,
    ) -> dict:
        """The mask as base64 PNG (``mask_png``; one per slice in ``slices``), the mask file `espmedsam
        predict` writes for the same input (``mask_file``: PNG, or NIfTI for NIfTI and DICOM), the modality,
        its probability when the classifier chose it and whether the image looks like any modality at all
        (``known``), the size, the foreground and the time taken."""
        name = display_name(file.filename)
        data = file.file.read()
        segmentation = app.state.segmenter.segment(data, name, modality, quality_later=quality_later)
        return result_of(segmentation, details)

    @app.post(
        "/api/quality",
        response_model=QualityResult,
        responses={422: ERROR_RESPONSES[422]},
        summary="The quality score an /api/segment request left for later",
    )
    def quality(request: QualityRequest) -> dict:
        """The predicted Dice of a kept image's prompt-free mask (its ``image_id``), from the embedding its
        ``/api/segment`` request computed while no other image came between."""
        return quality_of(app.state.segmenter.quality(request.image_id))

    @app.post(
        "/api/prompt",
        response_model=PromptResult,
        responses={422: ERROR_RESPONSES[422]},
        summary="Correct a segmented image's mask with boxes and clicks",
    )
    def prompt(request: PromptRequest) -> dict:
        """The mask of all the prompts so far on an image ``/api/segment`` kept (its ``image_id``): each box
        one object with the clicks inside it, clicks alone a local correction of the prompt-free mask
        (as ``espmedsam predict --box/--point``). The image's embedding is computed once and reused, so a
        correction costs decoder passes only. Coordinates are the image's pixels; an empty prompt list, or
        one outside the image, is a 422."""
        prompts = Prompts.of(request.boxes, request.points, request.labels)
        return correction_of(app.state.segmenter.correct(request.image_id, prompts))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EspMedSAMError)
    async def known_error(request: Request, error: EspMedSAMError) -> JSONResponse:
        status = next(code for kind, code in STATUS_OF_ERROR if isinstance(error, kind))
        return JSONResponse({"detail": " ".join(str(error).split())}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{_field(item)}: {item.get('msg', 'invalid')}" for item in error.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(error).__name__})"}, status_code=500)


def _field(problem: dict) -> str:
    """A validation problem's field name: ("body", "file") -> "file"."""
    location = [str(part) for part in problem.get("loc", ()) if part not in ("body", "query")]
    return ".".join(location) or "request"
