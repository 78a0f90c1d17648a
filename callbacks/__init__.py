"""Lightning callbacks of llmp, installed as ``llmp.callbacks``."""
