"""The last steps of every output image: watermark, encode with its labels, sign.

The order is the point: the watermark changes pixels, so it comes before encoding; the image is
then encoded in the job's format (``diffq.worker.encoding``) with the generation parameters (unless
the request opted out) and the IPTC "generated" label (XMP, always); the C2PA signature comes last, over the final
bytes, because its hard binding covers every byte outside the manifest and any later write would break it.

Built once per worker process (``Marker.from_settings``): a signing certificate or key that
cannot sign, or a watermark payload without its library, stops the worker at start with a
message naming the setting, not at its first job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import c2pa
from PIL import Image

from diffq.app import __version__
from diffq.app.contract.records import JobMode, JobParams, ModelRecord
from diffq.app.provenance import credentials, labels, watermark
from diffq.app.provenance.credentials import ContentSigner, CredentialsError, Ingredient
from diffq.app.settings import Settings
from diffq.worker.encoding import EncodedImage, encode_image
from diffq.worker.png import png_text

log = logging.getLogger(__name__)


class SigningFailedError(Exception):
    """The job's key requires content credentials and the image could not be signed."""


@dataclass(frozen=True)
class Marked(EncodedImage):
    """One finished image's stored bytes, and what the job should be told about its marks."""

    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Marker:
    """What this deployment marks its outputs with (``None``: that mark is off)."""

    label: bool = True
    signer: ContentSigner | None = None
    payload: bytes | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Marker:
        """Load the signer and check the watermark library; ``CredentialsError`` names the setting to fix."""
        signer = None
        if (settings.c2pa_cert is None) != (settings.c2pa_key is None):
            raise CredentialsError("DIFFQ_C2PA_CERT and DIFFQ_C2PA_KEY go together: set both, or neither")
        if settings.c2pa_cert is not None and settings.c2pa_key is not None:
            signer = ContentSigner.from_files(
                settings.c2pa_cert, settings.c2pa_key, settings.c2pa_alg, settings.c2pa_timestamp_url
            )
            log.info("signing C2PA content credentials as %r", signer.issuer)
        payload = settings.watermark_payload.encode() if settings.watermark_payload else None
        if payload is not None and not watermark.available():
            raise CredentialsError(
                "DIFFQ_WATERMARK_PAYLOAD needs the invisible-watermark package (diffq's worker "
                "extra): install it, or unset DIFFQ_WATERMARK_PAYLOAD"
            )
        return cls(label=settings.ai_label, signer=signer, payload=payload)

    def finish(
        self,
        image: Image.Image,
        params: JobParams,
        seed: int,
        model: ModelRecord,
        inputs: Mapping[str, bytes] | None = None,
    ) -> Marked:
        """The stored bytes of one output image, in the job's format, every mark applied in order."""
        warnings: list[str] = []
        if self.payload is not None:
            if watermark.fits(image.width, image.height):
                image = watermark.embed(image, self.payload)
            else:
                warnings.append(
                    f"watermark: not applied to images smaller than {watermark.MIN_SIDE}×"
                    f"{watermark.MIN_SIDE} (this one is {image.width}×{image.height})"
                )
        edited = params.mode is not JobMode.TXT2IMG
        text = png_text(params, seed, model) if params.metadata else None
        label = labels.source_type(edited) if self.label else None
        encoded = encode_image(image, params.output_format, params.quality, text, label)
        data = encoded.data
        policy = params.content_credentials
        if policy == "required" and self.signer is None:
            raise SigningFailedError(
                "content credentials are required for this API key and this worker has no "
                "signing certificate (DIFFQ_C2PA_CERT, DIFFQ_C2PA_KEY)"
            )
        if policy != "off" and self.signer is not None:
            manifest = credentials.manifest(
                __version__,
                model.name,
                {"weights_hash": model.weights_hash},
                edited=edited,
                title=f"diffq-{seed}.{encoded.extension}",
            )
            source = (inputs or {}).get("image") if edited else None
            ingredient = Ingredient(source, "image/png", "input.png") if source is not None else None
            try:
                data = self.signer.sign(data, encoded.content_type, manifest, ingredient)
            except c2pa.C2paError as error:
                if policy == "required":
                    raise SigningFailedError(f"could not sign content credentials: {error}") from None
                log.warning("could not sign content credentials: %s", error)
                warnings.append(
                    "content credentials: not signed (the signer failed); the image carries the IPTC label only"
                )
        return Marked(data, encoded.content_type, encoded.extension, tuple(warnings))
