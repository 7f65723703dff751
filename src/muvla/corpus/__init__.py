"""The on-disk corpus format: one owner for the files every stage writes and reads.

``muvla.corpus.region_store`` (the region store), and the layout of a corpus folder. The command that
builds a whole corpus lives in ``muvla.corpus.build``; it is not imported here, so the stages can
import this package without a cycle.
"""

from muvla.corpus.region_store import ImageRegions, RegionPartWriter, RegionStore, merge_region_parts

__all__ = ["ImageRegions", "RegionPartWriter", "RegionStore", "merge_region_parts"]
