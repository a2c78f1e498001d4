"""Triton python-backend model code of every merged `unet_user_<id>` (serving mode 1),
copied there by `facetron export add-user`: see facetron.serving.unet_user."""

from facetron.serving.unet_user import UnetUserModel as TritonPythonModel  # noqa: F401
