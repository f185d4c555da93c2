"""Shipped tuning databases (a resource package: qflash_gen.tuning_db), one ``<gpu>.yaml`` per GPU.

Read through ``qflash_gen.db``; see README.md in this directory for the format."""
