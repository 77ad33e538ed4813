"""Settings of the tokenizer service (the models themselves: server.settings.ModelSettings)."""

from __future__ import annotations

from dataclasses import dataclass

from genloom.services.server.settings import Settings, SettingsError, setting


@dataclass(frozen=True)
class TokenizerSettings(Settings):
    max_inputs: int = setting(
        4096,
        env="TOKENIZER_MAX_BATCH",
        help="Most inputs (texts, conversations or id sequences) in one tokenizer request.",
    )

    def validate(self) -> None:
        if self.max_inputs < 1:
            raise SettingsError("GENLOOM_TOKENIZER_MAX_BATCH must be at least 1")
