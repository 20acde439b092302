"""Image reading, by the names it had when it was one module; new code imports from where each name lives:

- midog.pixels: any dtype/channel layout → RGB uint8 (`to_rgb_uint8`);
- midog.image_files: opening TIFF and MetaImage files, finding the one image of an interface folder;
- midog.stack_io: the Track 2 page stack (`open_stack`, `PageStack`);
- midog.roi_io: the Track 1 region of interest (`open_roi`, `RoiImage`, `ArrayRoi`, `PhysicalTransform`).

Kept for the code that imports these names from here (midog.verifier, midog.batch, training/).
"""

from midog.image_files import IMAGE_SUFFIXES, check_mha_header, find_single_image
from midog.pixels import to_rgb_uint8
from midog.roi_io import (ROI_PAD_VALUE, ROI_SUFFIXES, STREAM_SAMPLE_SEGMENTS, ArrayRoi, MhaRoi, PhysicalTransform,
                          RoiImage, TiffRoi, open_roi)
from midog.stack_io import STACK_SUFFIXES, MhaStack, PageStack, TiffStack, open_stack

__all__ = [
    "IMAGE_SUFFIXES", "ROI_PAD_VALUE", "ROI_SUFFIXES", "STACK_SUFFIXES", "STREAM_SAMPLE_SEGMENTS", "ArrayRoi",
    "MhaRoi", "MhaStack", "PageStack", "PhysicalTransform", "RoiImage", "TiffRoi", "TiffStack", "check_mha_header",
    "find_single_image", "open_roi", "open_stack", "to_rgb_uint8",
]
