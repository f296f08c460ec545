"""Types of the C extension built from _native.c (see there, lerp.py, weighted_sum.py and native.py)."""

def lerp(
    kind: int, avg_addresses: tuple[int, ...], value_addresses: tuple[int, ...], counts: tuple[int, ...], weight: float,
    threads: int, /,
) -> None: ...
def weighted_sum(
    kind: int, out_addresses: tuple[int, ...], input_addresses: tuple[int, ...], weights: tuple[float, ...],
    counts: tuple[int, ...], divisor: float, threads: int, /,
) -> None: ...
def advise_huge_pages(address: int, nbytes: int, /) -> int: ...
def copy(
    target_addresses: tuple[int, ...], source_addresses: tuple[int, ...], sizes: tuple[int, ...], threads: int, /,
) -> None: ...
