"""DVC: the stage graph, reproducing one stage, pushing artefacts, reading locked hashes."""
