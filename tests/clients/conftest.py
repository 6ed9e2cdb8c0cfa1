# These are training scripts, run by tests/test_clients.py in their own processes: importing
# them (pytest --doctest-modules imports every module under tests/) would train at import.
collect_ignore_glob = ["*.py"]
