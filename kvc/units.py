"""Sizes for people: bytes in decimal units (KB = 10^3 bytes), as kvc prints them."""


def human_bytes(n: float) -> str:
    """'512 B', '1.5 KB', '2.1 GB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
