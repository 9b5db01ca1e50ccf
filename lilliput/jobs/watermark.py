"""`lilliput watermark detect`: score a text's green tokens under a key (the detector is lilliput.data.watermark)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from lilliput.core.checkpoint import LoadConfig
from lilliput.core.options import flag, nested
from lilliput.data.watermark import WatermarkConfig
from lilliput.jobs.text_file import read_text


@dataclass(frozen=True)
class DetectJob:
    file: str = field(metadata=flag(positional=True))
    """Text file, or - for stdin."""
    key: str
    """The secret key the text was generated with."""
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model whose tokenizer the text was generated with."""
    config: WatermarkConfig = field(default=WatermarkConfig(), metadata=nested(skip=("delta",)))
    """The detector's settings (delta only matters when generating)."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print one JSON object."""


def run_detect(job: DetectJob) -> None:
    from lilliput.data.watermark import Detector

    text = sys.stdin.read() if job.file == "-" else read_text(job.file)
    _, tok = job.load.load()  # the tokenizer only matters, but it comes with its model
    result = Detector(job.key, job.config).detect_text(text, tok)
    if job.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.verdict}: z {result.z:.2f} (threshold {result.z_threshold}, false-positive rate "
              f"{result.fpr:.1e}), p {result.p_value:.3e}, {result.green}/{result.tokens_scored} green tokens "
              f"({result.green_fraction:.1%}, {result.tokens - result.tokens_scored} not scored)")
