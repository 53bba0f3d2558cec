"""Catalog settings (the ``catalog:`` section of the orchestrator config); validated without IO."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class MisuseConfig(BaseModel):
    """When an invocation rate counts as far above its baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        5.0, description="Rates are computed over windows of this length."
    )
    rate_factor: Annotated[float, Field(gt=1)] = Field(
        5.0, description="Alert when a window's rate exceeds this multiple of the series' baseline."
    )
    min_rate_per_s: Annotated[float, Field(ge=0)] = Field(
        5.0, description="Rates below this never alert (a quiet model going from 0.1/s to 1/s is not misuse)."
    )
    warmup_windows: Annotated[int, Field(ge=1, le=10_000)] = Field(
        6, description="Windows a series must have been seen before its baseline is trusted."
    )
    baseline_alpha: Annotated[float, Field(gt=0, le=1)] = Field(
        0.1, description="Smoothing of the baseline rate (exponential moving average weight)."
    )


class CatalogConfig(BaseModel):
    """Who may publish models, and how wipes are tracked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_signatures: bool = Field(
        True,
        description="Refuse pushes without a valid Ed25519 signature of a trusted publisher. Off: "
        "unsigned pushes are stored and listed as unsigned by the compliance report.",
    )
    trusted_publishers: list[Path] = Field(
        default_factory=list, description="PEM files of trusted publisher public keys."
    )
    trusted_publishers_dir: Path | None = Field(
        None, description="Directory whose *.pub and *.pem files are trusted publisher public keys."
    )
    wipe_deadline_s: Annotated[float, Field(gt=0, le=7 * 86400)] = Field(
        60.0, description="A node that has not confirmed a wipe by then is quarantined."
    )
    wipe_resend_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        3.0, description="How often an unconfirmed wipe order is sent again."
    )
    misuse: MisuseConfig = Field(default_factory=MisuseConfig)
