"""C2PA content credentials: a manifest signed with the deployment's certificate, and reading one.

Everything C2PA goes through the ``c2pa-python`` library (the Content Authenticity Initiative's
own bindings): no hand-written JUMBF, CBOR or COSE. Signing must be the last write to an image's
bytes, since the manifest's hard binding covers every byte outside itself; any later change (a
pixel, a text chunk) makes validation fail with ``assertion.dataHash.mismatch``.

The claim thumbnail is turned off: for the small images of the default model it would be ten
times larger than the image, and it repeats the pixels the image already holds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import c2pa

#: Validation failures that still mean "intact and signed": the signer's CA is not on the
#: C2PA trust list, as for every private CA (and every test chain).
UNTRUSTED_ONLY = frozenset({"signingCredential.untrusted"})

#: How the manifest's ``c2pa.opened`` action names the input image of an edit.
INGREDIENT_LABEL = "input"

Algorithm = Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"]


class CredentialsError(Exception):
    """The signing certificate or key cannot be used; the message names the setting to fix."""


@dataclass(frozen=True)
class Ingredient:
    """An input image an edit was made from, recorded in the manifest as its parent."""

    data: bytes
    mime: str
    title: str


class ContentSigner:
    """Signs images with one certificate chain and key, loaded once per process."""

    def __init__(
        self, cert_pem: bytes, key_pem: bytes, algorithm: Algorithm = "es256", timestamp_url: str | None = None
    ) -> None:
        try:
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(algorithm, cert_pem, key_pem, timestamp_url))
        except c2pa.C2paError as error:
            raise CredentialsError(
                f"DIFFQ_C2PA_CERT / DIFFQ_C2PA_KEY / DIFFQ_C2PA_ALG: not a usable "
                f"{algorithm} certificate chain and key: {error}"
            ) from None
        self._context = c2pa.Context(settings=c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
        self.issuer = ""
        self.check()

    @classmethod
    def from_files(
        cls, cert: Path, key: Path, algorithm: Algorithm = "es256", timestamp_url: str | None = None
    ) -> ContentSigner:
        """A signer from PEM files (``DIFFQ_C2PA_CERT``: the chain, signer first; ``DIFFQ_C2PA_KEY``)."""
        try:
            cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        except OSError as error:
            raise CredentialsError(
                f"DIFFQ_C2PA_CERT / DIFFQ_C2PA_KEY: cannot read {error.filename}: {error.strerror}"
            ) from None
        return cls(cert_pem, key_pem, algorithm, timestamp_url)

    def check(self) -> None:
        """Sign and validate a one-pixel image, so a bad chain or key is found at start, not per job."""
        probe = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (1, 1)).save(probe, format="PNG")
        try:
            signed = self.sign(probe.getvalue(), "image/png", manifest("diffq", "probe", {}, edited=False))
        except c2pa.C2paError as error:
            raise CredentialsError(f"DIFFQ_C2PA_CERT / DIFFQ_C2PA_KEY cannot sign: {error}") from None
        report = read(signed, "image/png")
        if not report.get("valid"):
            raise CredentialsError(
                f"DIFFQ_C2PA_CERT / DIFFQ_C2PA_KEY: a test signature does not validate "
                f"({', '.join(report.get('failures', []))})"
            )
        self.issuer = report.get("signer", {}).get("common_name") or ""

    def sign(
        self, data: bytes, mime: str, manifest_json: dict[str, Any], ingredient: Ingredient | None = None
    ) -> bytes:
        """``data`` with a signed manifest embedded; raises ``c2pa.C2paError`` if it cannot be signed."""
        with c2pa.Builder(manifest_json, context=self._context) as builder:
            if ingredient is not None:
                builder.add_ingredient(
                    {"title": ingredient.title, "relationship": "parentOf", "label": INGREDIENT_LABEL},
                    ingredient.mime,
                    io.BytesIO(ingredient.data),
                )
            out = io.BytesIO()
            builder.sign(self._signer, mime, io.BytesIO(data), out)
        return out.getvalue()


def manifest(
    generator_version: str,
    model: str,
    model_info: dict[str, str],
    *,
    edited: bool,
    title: str = "image",
    digital_source_type: str | None = None,
) -> dict[str, Any]:
    """The manifest of one output: who made it (``diffq <version>``), how, with which model.

    An edit opens its input (the ingredient added by ``sign``) and then edits it: C2PA 2 wants
    the first action to be ``c2pa.created`` or ``c2pa.opened``."""
    from diffq.app.provenance.labels import source_type

    made = {
        "action": "c2pa.edited" if edited else "c2pa.created",
        "digitalSourceType": digital_source_type or source_type(edited),
        "softwareAgent": {"name": "diffq", "version": generator_version},
        "parameters": {"model": model, **model_info},
    }
    opened = {"action": "c2pa.opened", "parameters": {"ingredientIds": [INGREDIENT_LABEL]}}
    actions = [opened, made] if edited else [made]
    return {
        "claim_generator_info": [{"name": "diffq", "version": generator_version}],
        "title": title,
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}}],
    }


def read(data: bytes, mime: str | None = None) -> dict[str, Any]:
    """What C2PA manifest ``data`` carries: present, valid (intact, signed; an untrusted CA is
    allowed), state, failures, signer, actions, digital source type, generator, ingredients."""
    stream = io.BytesIO(data)
    try:
        reader = c2pa.Reader.try_create(mime, stream) if mime else c2pa.Reader.try_create(stream)
    except c2pa.C2paError as error:
        return {"present": True, "valid": False, "state": "Invalid", "failures": [f"unreadable: {error}"]}
    if reader is None:
        return {"present": False, "valid": False}
    with reader:
        active = reader.get_active_manifest() or {}
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
    failures = [item.get("code", "") for item in (results.get("activeManifest") or {}).get("failure", [])]
    actions = [
        action
        for assertion in active.get("assertions", [])
        if assertion.get("label", "").startswith("c2pa.actions")
        for action in assertion.get("data", {}).get("actions", [])
    ]
    signature = active.get("signature_info", {})
    return {
        "present": True,
        "valid": state in ("Valid", "Trusted") and set(failures) <= UNTRUSTED_ONLY,
        "trusted": state == "Trusted",
        "state": state,
        "failures": failures,
        "signer": {"issuer": signature.get("issuer"), "common_name": signature.get("common_name")},
        "actions": [action.get("action") for action in actions],
        "digital_source_type": next((a.get("digitalSourceType") for a in actions if a.get("digitalSourceType")), None),
        "generator": [
            f"{g.get('name')} {g.get('version', '')}".strip() for g in active.get("claim_generator_info", [])
        ],
        "parameters": next((a.get("parameters") for a in actions if a.get("parameters")), None),
        "ingredients": [i.get("title") for i in active.get("ingredients", [])],
    }
