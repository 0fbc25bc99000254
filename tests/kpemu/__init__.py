# kpemu: an IBM Key Protect + IAM emulator for keyfs tests (standard library only); see server.py
from .certs import Certs, make_certs
from .server import ApiError, Emulator, Fault, FAULT_KINDS, seal

__all__ = ["ApiError", "Certs", "Emulator", "Fault", "FAULT_KINDS", "make_certs", "seal"]
