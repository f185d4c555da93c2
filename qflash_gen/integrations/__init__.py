"""qflash-gen inside PyTorch models.

* :mod:`.ops` -- ``torch.library`` custom ops (``torch.ops.qflash_gen.attention`` and
  ``attention_static``): one opaque node for ``torch.compile``;
* :mod:`.base`, :mod:`.attention` -- the patched attention modules (scale modes, exact transforms);
* :mod:`.calibration` -- calibration statistics -> static scales and transforms, and their folding
  into copies of the weights;
* :mod:`.timm` -- ``patch_model``, ``calibrate``: swapping timm's attention for these modules.
"""
