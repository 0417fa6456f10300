"""Config section ``network:`` (pydantic; imported by :mod:`flotilla.config`; no torch, no grpc).

Only ``flotilla serve`` reads it.  The algorithm settings are the experiment's own: ``mode``,
``rounds`` (server steps), ``cohort``, ``client``, ``server``, ``async`` (FedBuff concurrency,
buffer size K, staleness weights, max staleness).  Paths are relative to the working directory.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from flotilla.core.schema import Section


class _Strict(Section):
    """Every fleet/async key: see flotilla.core.schema."""


class TLSConfig(_Strict):
    cert: str = Field(..., description="server certificate chain, PEM (`flotilla certs DIR` writes DIR/server.pem)")
    key: str = Field(..., description="server private key, PEM (DIR/server.key)")
    ca: str | None = Field(
        None, description="CA that signs client certificates (DIR/ca.pem); needed with require_client_cert"
    )
    require_client_cert: bool = Field(
        False, description="mutual TLS: refuse connections without a client certificate from ca"
    )

    @model_validator(mode="after")
    def _ca_for_mtls(self):
        if self.require_client_cert and not self.ca:
            raise ValueError("ca: required when require_client_cert is true")
        return self


class NetworkConfig(_Strict):
    tls: TLSConfig
    tokens: str = Field(
        ..., description="device token table (`flotilla certs DIR` writes DIR/tokens.json); unknown tokens are refused"
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: all interfaces)")
    data_port: int | Literal["auto", "off"] = Field(
        "auto",
        description="the data plane's TCP port (downloads and uploads without gRPC, same host, TLS and tokens; "
        'devices learn it at check-in): auto (any free port), a number, or "off" (quoted: gRPC carries them)',
    )
    sealed_download_port: int | Literal["auto", "off"] = Field(
        "off",
        description="sealed downloads (docs/deployment.md): the model over plain TCP on this port, AES-256-GCM-sealed "
        "once per version, its key, digest and a one-fetch ticket given in the TLS check-in reply (the server "
        "encrypts a version once, not once per device; uploads stay on TLS): auto (any free port), a number, "
        "or off",
    )
    sealed_uploads: bool = Field(
        False,
        description="sealed uploads (docs/deployment.md): updates over plain TCP on the sealed_download_port, "
        "AES-256-GCM-sealed under a key drawn for each assignment and given in the TLS check-in reply, through "
        "the data plane's upload handler (needs sealed_download_port and data_port)",
    )
    state_dir: str | None = Field(None, description="server state and run directory (default: output.dir/output.name)")
    # sync rounds
    over_selection: float = Field(
        1.3,
        ge=1,
        description="sync: hand out up to ceil(cohort x this) assignments per round; late results are refused",
    )
    selection_window_s: float = Field(
        1.0, ge=0, description="sync: collect check-ins this long, then draw the round's devices uniformly"
    )
    secagg_stage_s: float = Field(
        30.0,
        gt=0,
        description="sync secure aggregation: a protocol stage closes this long after it opened (devices that have not answered dropped out)",
    )
    round_deadline_s: float | None = Field(
        300.0,
        gt=0,
        description="sync: close a round after this many seconds if min_updates "
        "arrived (else extend it), so a failing device cannot stall the run; null: no deadline",
    )
    min_updates: int = Field(1, ge=1, description="sync: updates a round needs to close at its deadline")
    # both modes
    assignment_timeout_s: float = Field(
        120.0, gt=0, description="an assignment not uploaded within this is dropped and its slot reassigned"
    )
    max_update_norm: float | None = Field(None, gt=0, description="refuse updates whose L2 norm exceeds this")
    max_update_abs: float | None = Field(
        1e6,
        gt=0,
        description="refuse updates with any value larger than this in magnitude "
        "(the default keeps every sum of updates finite: an update of all 3e38 is finite but "
        "overflows the aggregate); a step that still makes the model non-finite is rolled back; "
        "null: no bound",
    )
    max_examples: int | None = Field(None, ge=1, description="refuse updates claiming more training examples than this")
    max_message_mb: float = Field(
        4.0,
        gt=0,
        le=2047,
        description="largest gRPC message accepted (models stream in chunks below it; gRPC's limit is < 2 GiB)",
    )
    chunk_kb: int = Field(1024, ge=1, description="chunk size of model downloads")
    rate_limit: float = Field(20.0, gt=0, description="requests per second per device, on average")
    rate_burst: int = Field(40, ge=1, description="requests a device may make in a burst")
    uploads_per_device: int = Field(
        2, ge=1, description="upload streams one device may have open at once (and one per assignment)"
    )
    upload_timeout_s: float = Field(
        300.0, gt=0, description="an upload stream must finish within this (a stalled one is cut and its slot freed)"
    )
    compression: Literal["none", "gzip", "deflate"] = Field(
        "none", description="gRPC compression of the server's messages"
    )
    retry_after_s: float = Field(0.5, gt=0, description="how long devices with no work wait before checking in again")
    fsync: bool = Field(True, description="fsync every accepted update and snapshot (off only for throwaway runs)")
    linger_s: float = Field(
        10.0, ge=0, description="after the last step, keep telling devices 'done' this long, then exit"
    )
    aggregators: int = Field(
        0,
        ge=0,
        description="async scale-out: the coordinator waits for this many aggregator processes that take the "
        "uploads (serve --aggregators N starts them here; see docs/deployment.md, Scaling out); 0: one process",
    )

    @model_validator(mode="after")
    def _data_port_range(self):
        for name in ("data_port", "sealed_download_port"):
            value = getattr(self, name)
            if isinstance(value, int) and not 0 <= value <= 65535:
                raise ValueError(f"{name}: must be between 0 and 65535, auto or off, got {value}")
        return self

    @model_validator(mode="after")
    def _sealed_uploads_need(self):
        if self.sealed_uploads and self.sealed_download_port == "off":
            raise ValueError(
                "sealed_uploads: they travel on the sealed port; set sealed_download_port (auto or a number)"
            )
        if self.sealed_uploads and self.data_port == "off":
            raise ValueError(
                "sealed_uploads: they run through the data plane's upload handler; set data_port (auto or a number)"
            )
        return self

    @model_validator(mode="after")
    def _sealed_downloads_here(self):
        if self.sealed_download_port != "off" and self.aggregators:
            raise ValueError(
                "sealed_download_port: not with aggregators (the aggregators serve the downloads, over TLS); "
                "set it to off"
            )
        return self

    @model_validator(mode="after")
    def _chunk_fits(self):
        if self.chunk_kb * 1024 + 1024 > self.max_message_mb * 2**20:
            raise ValueError(f"chunk_kb: {self.chunk_kb} KiB chunks do not fit in max_message_mb={self.max_message_mb}")
        return self
