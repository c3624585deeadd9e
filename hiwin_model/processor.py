"""Pre-processing lives in the torch-free :mod:`hiwin_runtime.processor`; re-exported here."""

from hiwin_runtime.processor import (HiwinProcessor, PreparedImage, TextDeltas, TokenIds, resolve_token_ids,
                                     separator_id)

__all__ = ["HiwinProcessor", "PreparedImage", "TextDeltas", "TokenIds", "resolve_token_ids", "separator_id"]
