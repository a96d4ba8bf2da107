"""Pure tensor math of kernel rules: no modules, no state."""

from . import elementwise
