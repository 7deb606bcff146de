"""Access decisions for clinical data: one policy, pure functions, reasons for every answer."""
