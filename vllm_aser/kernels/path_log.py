"""Which kernel path every ASER layer of this process took, logged once as a summary: per path, how many layers,
and for each fallback the first few layer names and the reason.

The quantization methods say how many layers they created (`expect`) and when one is prepared (`finished`); the
kernels record each prepared linear's path (`record`). vLLM creates every layer before loading any weights, so the
summary goes out when the last method finishes.
"""

from __future__ import annotations

import threading

SHOWN_NAMES = 3


class KernelPathLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.expected = 0
        self.finished_count = 0
        self.paths: dict[tuple[str, str, str], list[str]] = {}  # (kernel, path, reason) -> layer names

    def expect(self) -> None:
        with self._lock:
            self.expected += 1

    def record(self, kernel: str, path: str, reason: str, name: str) -> None:
        with self._lock:
            self.paths.setdefault((kernel, path, reason), []).append(name)

    def finished(self) -> None:
        with self._lock:
            self.finished_count += 1
            if self.finished_count != self.expected:
                return
            lines = self.summary()
            self.paths = {}
        from vllm.logger import init_logger

        logger = init_logger("vllm.aser")
        for line in lines:
            logger.info("%s", line)

    def summary(self) -> list[str]:
        lines = []
        for (kernel, path, reason), names in sorted(self.paths.items(), key=lambda kv: -len(kv[1])):
            count = f"{len(names)} layer{'s' if len(names) != 1 else ''}"
            if reason.startswith("fallback: "):
                shown = ", ".join(names[:SHOWN_NAMES]) + (f", ... ({len(names) - SHOWN_NAMES} more)"
                                                         if len(names) > SHOWN_NAMES else "")
                lines.append(f"ASER {kernel} kernel: {path} path for {count} ({shown}): {reason[10:]}")
            else:
                lines.append(f"ASER {kernel} kernel: {path} path for {count} ({reason})")
        return lines


PATHS = KernelPathLog()
