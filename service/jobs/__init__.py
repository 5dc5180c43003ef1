"""Jobs: the record and its states (``record``), its named transitions (``lifecycle``), its
store on S3 (``store``) and change notices (``events``).

Importing this package imports nothing else: the client imports ``record`` without the store.
"""
