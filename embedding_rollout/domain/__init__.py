"""Domain logic: model versions, traffic split and deployment state. No I/O to servers here."""
