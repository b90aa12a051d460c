"""The engine child's settings cross a process boundary as JSON (services/engines/engine_proc.py):
the KV store's TLS files and etcd settings must arrive as the dataclasses VllmSettings expects,
not as dicts (vllm_engine reads their attributes)."""

from __future__ import annotations

from services.engines.engine_proc import settings_from_json, settings_to_json
from services.membership import EtcdSettings
from services.tls import TlsFiles


def test_tls_and_etcd_settings_survive_the_trip(tmp_path) -> None:
    files = {name: tmp_path / name for name in ("c.pem", "k.pem", "ca.pem", "etcd-ca.pem", "pw")}
    for path in files.values():
        path.write_text("x")
    tls = TlsFiles(cert=str(files["c.pem"]), key=str(files["k.pem"]), ca=str(files["ca.pem"]), server_name="store.mesh")
    etcd = EtcdSettings(ca=str(files["etcd-ca.pem"]), user="mesh", password_file=str(files["pw"]))
    settings = {"model_dir": "/m", "model_name": "x", "max_num_seqs": 4, "kvstore_tls": tls,
                "kvstore_etcd_settings": etcd}
    back = settings_from_json(settings_to_json(settings))
    assert back == settings
    assert isinstance(back["kvstore_tls"], TlsFiles) and isinstance(back["kvstore_etcd_settings"], EtcdSettings)


def test_settings_without_them_are_left_as_they_are() -> None:
    settings = {"model_dir": "/m", "kvstore_tls": None}
    assert settings_from_json(settings_to_json(settings)) == settings
