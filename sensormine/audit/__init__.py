"""The audit log: who changed what, written in the same transaction as the change; and the actor protocol
every use case takes (who acts, with which role, under which row-level-security scope)."""
