"""The results layer: one vocabulary for every stored number.

``store`` writes and reads the Parquet rows, ``report`` turns them into tables and ``plots``
into figures. Nothing below this package trains or measures; everything above it writes and
reads rows only through it.
"""
