"""collab.release: signed registry, targeting policies and staged rollouts, the HTTPS server and the rover's pull."""

from __future__ import annotations

import json
import shutil

import pytest

from forest_perception.collab.release import client as rc
from forest_perception.collab.release import registry as rg
from forest_perception.collab.release import signing
from forest_perception.collab.release.hardware import default_release_hardware, detect_hardware_class
from forest_perception.models.weights import shipped_model

SMALL = "autoencoder_160x128_int8"  # 2 MB: the release the tests move around
BIG = "multiscale_320x240"


class Clock:
    """A clock the tests move by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------------------------- signing, hardware


def test_manifest_signatures_catch_changes_missing_signatures_and_other_keys(tmp_path):
    private, public = signing.make_signing_key(tmp_path / "k.key", tmp_path / "k.pub")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    key, trusted = signing.load_signing_key(private), signing.load_verify_key(public)
    manifest = {"release": "r0001-x", "artefacts": [{"sha256": "a" * 64, "size": 3}]}
    signature = signing.sign_manifest(manifest, key)
    signing.verify_manifest(json.loads(json.dumps(manifest)), signature, trusted)  # a JSON round trip still verifies
    changed = {**manifest, "artefacts": [{"sha256": "b" * 64, "size": 3}]}
    with pytest.raises(signing.SignatureError, match="bad signature"):
        signing.verify_manifest(changed, signature, trusted)
    with pytest.raises(signing.SignatureError, match="unsigned"):
        signing.verify_manifest(manifest, "", trusted)
    other, _ = signing.make_signing_key(tmp_path / "o.key", tmp_path / "o.pub")
    stranger = signing.sign_manifest({**manifest, "key_id": "feed"}, signing.load_signing_key(other))
    with pytest.raises(signing.SignatureError, match=f"trusted key {signing.key_id(trusted)}"):
        signing.verify_manifest({**manifest, "key_id": "feed"}, stranger, trusted)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ValueError, match="junk.pub is not a PEM public key"):
        signing.load_verify_key(tmp_path / "junk.pub")


def test_hardware_classes_and_release_defaults():
    assert detect_hardware_class("aarch64", ["CPUExecutionProvider"]) == "pi4"
    assert detect_hardware_class("aarch64", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "jetson"
    assert detect_hardware_class("x86_64", ["CPUExecutionProvider"]) == "pc"
    assert default_release_hardware("autoencoder_160x128_int8") == (["pi4", "pc"], ["CPUExecutionProvider"])
    assert default_release_hardware("multiscale_320x240_int8")[0] == ["pc"]
    hardware, providers = default_release_hardware("multiscale_320x240")
    assert hardware == ["jetson", "pc"] and providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


# ---------------------------------------------------------------------------------------------- registry


@pytest.fixture
def registry(tmp_path):
    clock = Clock()
    reg = rg.ReleaseRegistry(tmp_path / "registry", clock=clock)
    reg.clock_ = clock
    return reg


def test_create_stores_each_artefact_by_content_signs_and_audits(registry):
    manifest = registry.create(shipped_model(SMALL), notes="first")
    assert manifest["release"].startswith(f"r0001-{SMALL}-") and manifest["hardware"] == ["pi4", "pc"]
    roles = {a["role"]: a for a in manifest["artefacts"]}
    assert set(roles) == {"onnx", "card", "card_md", "checkpoint"}  # the int8 card names its fp32 checkpoint
    assert roles["checkpoint"]["file"] == "autoencoder_160x128.pt"
    for entry in manifest["artefacts"]:
        stored = registry.object_path(entry["sha256"])
        assert rg.file_sha256(stored) == entry["sha256"] and stored.stat().st_size == entry["size"]
    stored_manifest, signature = registry.release("1")
    signing.verify_manifest(stored_manifest, signature, signing.load_verify_key(registry.public_key_path))
    again = registry.create(shipped_model(SMALL))  # the same files again: a new release, no new objects
    assert again["release"].startswith("r0002-") and len(list((registry.root / "objects").iterdir())) == 4
    assert [e["action"] for e in registry.audit()] == ["create", "create"]
    assert registry.resolve("r0002") == again["release"] and registry.resolve(again["release"][:6]) == again["release"]
    with pytest.raises(rg.RegistryError, match="ambiguous"):
        registry.resolve("r000")
    with pytest.raises(rg.RegistryError, match="no release 'r0009'"):
        registry.resolve("r0009")


def test_create_refuses_a_model_without_card_and_a_broken_onnx(registry, tmp_path):
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(shipped_model(SMALL), bare)
    with pytest.raises(rg.RegistryError, match="model card bare.json is missing"):
        registry.create(bare)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x01garbage")
    with pytest.raises(rg.RegistryError, match="broken.onnx"):
        registry.create(broken)
    with pytest.raises(ValueError, match="unknown hardware class 'toaster'"):
        registry.create(shipped_model(SMALL), hardware=["toaster"])
    assert registry.releases() == []


def test_policies_pick_rovers_by_id_group_and_hardware(registry):
    small = registry.create(shipped_model(SMALL))["release"]
    big = registry.create(shipped_model(BIG))["release"]
    rovers = {"a": rg.RoverInfo("a", ("north",), "pi4"), "b": rg.RoverInfo("b", ("south",), "jetson"),
              "c": rg.RoverInfo("c", ("north",), "pc")}
    for rover in rovers.values():
        assert registry.announce(rover).release is None  # nothing promoted yet
    with pytest.raises(rg.RegistryError, match="made for jetson, pc, not for pi4"):
        registry.promote(big, rg.Selector(hardware=["pi4"]))
    registry.promote(small, rg.Selector(groups=["north"]))
    registry.promote(big, rg.Selector(hardware=["jetson"]))
    assigned = {name: registry.announce(rover).release for name, rover in rovers.items()}
    assert assigned == {"a": small, "b": big, "c": small}
    # a release for every rover does not reach the pi4: it is not made for that hardware
    registry.promote(big)
    assigned = {name: registry.announce(rover).release for name, rover in rovers.items()}
    assert assigned == {"a": small, "b": big, "c": big}
    registry.promote(small, rg.Selector(rovers=["c"]))
    assert registry.announce(rovers["c"]).release == small
    with pytest.raises(rg.RegistryError, match="already rolling out"):
        registry.promote(small, rg.Selector(rovers=["c"]))


def healthy(registry, rover, release, n=2, latency=10.0, rate=15.0, step=10.0):
    for _ in range(n):
        registry.clock_.t += step
        registry.report(rover, release, "health", {"latency_ms": latency, "rate_hz": rate, "crashes": 0})


def test_a_canary_stage_advances_once_its_rovers_are_healthy_for_the_soak_time(registry):
    release = registry.create(shipped_model(SMALL))["release"]
    rovers = [rg.RoverInfo(f"rover_{i}") for i in range(4)]
    for rover in rovers:  # every rover reports its health on the model it runs now: the baseline
        registry.announce(rover)
        healthy(registry, rover.id, "", n=1)
    rollout = registry.promote(release, stages=[25, 100], thresholds=rg.Thresholds(soak_s=30, min_reports=2))
    canary = [r.id for r in rovers if registry.announce(r).release == release]
    assert len(canary) == 1  # 25 % of 4
    rest = [r.id for r in rovers if r.id not in canary]
    registry.report(canary[0], release, "installed", {"gate_absrel": 0.10, "gate_absrel_before": 0.11})
    healthy(registry, canary[0], release, n=1)
    assert registry.status()["rollouts"][0]["stage"] == 0  # one report: not yet
    healthy(registry, canary[0], release, n=1)
    assert registry.status()["rollouts"][0]["stage"] == 0  # 20 s of 30
    healthy(registry, canary[0], release, n=1)
    status = registry.status()["rollouts"][0]
    assert status["stage"] == 1 and status["state"] == "active"
    assert all(registry.announce(r).release == release for r in rovers)
    for rover in rest:
        healthy(registry, rover, release, n=4)
    status = registry.status()["rollouts"][0]
    assert status["state"] == "done" and status["id"] == rollout
    assert [e["action"] for e in registry.audit()].count("advance") == 1
    assert registry.status()["rovers"][0]["running"] == release


@pytest.mark.parametrize("bad, reason", [
    ({"latency_ms": 30.0, "rate_hz": 15.0}, "latency 30.0 ms is 3.00x"),
    ({"latency_ms": 10.0, "rate_hz": 5.0}, "rate 5.00 Hz is 0.33x"),
    ({"latency_ms": 10.0, "rate_hz": 15.0, "crashes": 2}, "2 depth node crash"),
])
def test_a_canary_that_regresses_rolls_the_release_back_by_itself(registry, bad, reason):
    old = registry.create(shipped_model(SMALL))["release"]
    new = registry.create(shipped_model(SMALL), notes="new")["release"]
    rovers = [rg.RoverInfo(f"rover_{i}") for i in range(3)]
    registry.promote(old, thresholds=rg.Thresholds(soak_s=0, min_reports=1))
    for rover in rovers:
        assert registry.announce(rover).release == old
        healthy(registry, rover.id, old, n=1)
    registry.promote(new, stages=[34, 100])
    canary = [r for r in rovers if registry.announce(r).release == new]
    assert len(canary) == 1
    events = []
    for _ in range(2):
        registry.clock_.t += 10
        events += registry.report(canary[0].id, new, "health", bad)
    assert len(events) == 1 and events[0]["event"] == "rolled_back" and reason in events[0]["reason"]
    # every rover runs the release before it again; the others never got the new one
    assert all(registry.announce(r).release == old for r in rovers)
    log = registry.audit()
    assert log[-1]["action"] == "rollback" and log[-1]["actor"] == "coordinator"
    assert reason in log[-1]["detail"]["reason"]


def test_a_refusal_or_a_worse_gate_metric_rolls_back_a_failed_install_does_not(registry):
    release = registry.create(shipped_model(SMALL))["release"]
    rovers = [rg.RoverInfo(f"rover_{i}") for i in range(2)]
    registry.promote(release, thresholds=rg.Thresholds(soak_s=0, min_reports=1))
    for rover in rovers:
        registry.announce(rover)
    assert registry.report("rover_0", release, "failed", reason="disk_full: ...") == []
    assert registry.status()["rollouts"][0]["state"] == "active"
    events = registry.report("rover_1", release, "installed", {"gate_absrel": 0.20, "gate_absrel_before": 0.10})
    assert events[0]["event"] == "rolled_back" and "held-out AbsRel up 0.1000" in events[0]["reason"]
    second = registry.create(shipped_model(SMALL))["release"]
    registry.promote(second)
    registry.announce(rovers[0])
    events = registry.report("rover_0", second, "refused", reason="hash_mismatch: tampered")
    assert events[0]["event"] == "rolled_back" and "rover_0 refused it: hash_mismatch" in events[0]["reason"]


def test_rollback_by_hand_and_bad_requests(registry):
    release = registry.create(shipped_model(SMALL))["release"]
    rover = rg.RoverInfo("rover_0", hardware="pc")
    with pytest.raises(rg.RegistryError, match="no active or finished rollout"):
        registry.rollback(release)
    registry.promote(release)
    assert registry.announce(rover).release == release
    assert registry.rollback("1", reason="field reports") == [1]
    assert registry.announce(rover).release is None
    assert registry.audit()[-1]["detail"]["reason"] == "field reports"
    with pytest.raises(rg.RegistryError, match="report kind 'great'"):
        registry.report("rover_0", release, "great")
    with pytest.raises(rg.RegistryError, match="never asked for a release"):
        registry.report("rover_9", release, "health")
    for stages in ("50,90", "60,30,100", "0,100", "x"):
        with pytest.raises(rg.RegistryError, match="stages"):
            rg.parse_stages(stages)
    with pytest.raises(rg.RegistryError, match="min_rate_ratio"):
        rg.Thresholds(min_rate_ratio=2.0).validate()


def test_a_stage_timeout_rolls_back_a_canary_that_never_reports(registry):
    release = registry.create(shipped_model(SMALL))["release"]
    registry.promote(release, thresholds=rg.Thresholds(stage_timeout_s=60))
    registry.announce(rg.RoverInfo("quiet"))
    registry.clock_.t += 61
    events = registry.evaluate()
    assert events[0]["event"] == "rolled_back" and "quiet: no health report yet" in events[0]["reason"]


# ---------------------------------------------------------------------------------------------- server and client


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with one small release for every rover, served over HTTPS with rover authentication."""
    from forest_perception.collab.deploy.certs import make_deployment_certs
    from forest_perception.collab.deploy.processes import free_ports
    from forest_perception.collab.release.auth import load_rover_public_keys
    from forest_perception.collab.release.server import ReleaseServer, server_certificate

    root = tmp_path_factory.mktemp("served")
    certs = make_deployment_certs(root / "certs", ["rover_0", "rover_1"])
    registry = rg.ReleaseRegistry(root / "registry")
    release = registry.create(shipped_model(SMALL))["release"]
    registry.promote(release)
    cert, key = server_certificate(certs.root)
    server = ReleaseServer(registry, port=free_ports(1)[0], certfile=cert, keyfile=key,
                           rover_keys=load_rover_public_keys(certs.root), log_level="critical").start()
    yield {"server": server, "registry": registry, "certs": certs, "release": release, "root": root}
    server.stop()


def client_for(served, store, rover="rover_0", hardware="pc", signed=True, **kwargs):
    certs = served["certs"]
    auth = certs.rover(rover).auth_key if signed and rover in certs.rovers else None
    return rc.ReleaseClient(served["server"].url, rg.RoverInfo(rover, (), hardware), store,
                            served["registry"].public_key_path, certs.ca_cert, auth, **kwargs)


def test_a_rover_pulls_verifies_and_installs_a_release_over_https(served, tmp_path):
    assert served["server"].url.startswith("https://127.0.0.1:")
    client = client_for(served, tmp_path / "store")
    announcement = client.announce()
    assert announcement.release == served["release"]
    progress = []
    installed = client.fetch(announcement, progress=lambda name, done, total: progress.append((name, done, total)))
    expected = sum(a["size"] for a in announcement.manifest["artefacts"])
    assert client.bytes_downloaded == expected and progress[-1][1] == progress[-1][2]
    assert installed.onnx.read_bytes() == shipped_model(SMALL).read_bytes()
    assert json.loads((installed.path / "manifest.json").read_text()) == announcement.manifest
    assert not list((tmp_path / "store" / rc.PARTIAL_DIR).iterdir())  # nothing half-done left
    assert client.fetch(announcement) == installed and client.bytes_downloaded == expected  # the store has it
    (installed.path / installed.artefact("card")["file"]).write_text("{}")  # damaged on the rover's disk
    assert client.installed(served["release"]) is None
    assert client.fetch(announcement).onnx.is_file() and client.bytes_downloaded == 2 * expected  # pulled again
    client.report(served["release"], "health", {"latency_ms": 5.0, "rate_hz": 15.0})
    assert client.installed(served["release"]) is not None


def test_an_interrupted_download_resumes_where_it_stopped(served, tmp_path):
    client = client_for(served, tmp_path / "store")
    announcement = client.announce()
    onnx = next(a for a in announcement.manifest["artefacts"] if a["role"] == "onnx")
    partial = tmp_path / "store" / rc.PARTIAL_DIR
    partial.mkdir(parents=True)
    data = shipped_model(SMALL).read_bytes()
    (partial / f"{onnx['sha256']}.part").write_bytes(data[: len(data) // 3])  # a download that broke off
    client.fetch(announcement)
    total = sum(a["size"] for a in announcement.manifest["artefacts"])
    assert client.bytes_downloaded == total - len(data) // 3


def test_a_long_poll_returns_when_the_assignment_changes(served, tmp_path):
    import threading
    import time

    client = client_for(served, tmp_path / "store", rover="rover_1")
    assert client.announce().release == served["release"]
    registry = served["registry"]
    other = registry.create(shipped_model(SMALL), notes="for rover_1")["release"]
    timer = threading.Timer(0.5, lambda: registry.promote(other, rg.Selector(rovers=["rover_1"])))
    timer.start()
    started = time.monotonic()
    answer = client.announce(have=served["release"], wait_s=20)
    assert answer.release == other and time.monotonic() - started < 10
    registry.rollback(other)
    assert client.announce(have=other).release == served["release"]


def test_tampered_unsigned_truncated_and_wrong_hardware_releases_are_refused(served, tmp_path):
    client = client_for(served, tmp_path / "store")
    good = client.announce()

    def forged(**changes):
        manifest = json.loads(json.dumps(good.manifest))
        manifest.update(changes)
        return rg.Announcement(good.release, manifest, good.signature)

    with pytest.raises(rc.ReleaseRefusedError, match="bad signature") as info:
        client.fetch(forged(hardware=["pi4", "pc", "jetson"]))
    assert info.value.code == "bad_signature"
    with pytest.raises(rc.ReleaseRefusedError, match="unsigned"):
        client.fetch(rg.Announcement(good.release, good.manifest, None))
    pi4 = client_for(served, tmp_path / "pi4", hardware="jetson")
    with pytest.raises(rc.ReleaseRefusedError, match="made for pi4, pc, this rover is jetson") as info:
        pi4.fetch(good)
    assert info.value.code == "wrong_hardware"
    # an artefact changed on the server after signing: the hash check refuses it, nothing is installed
    registry = served["registry"]
    card = next(a for a in good.manifest["artefacts"] if a["role"] == "card")
    stored = registry.object_path(card["sha256"])
    original = stored.read_bytes()
    try:
        stored.write_bytes(original.replace(b"{", b"[", 1))  # same size, other bytes
        with pytest.raises(rc.ReleaseRefusedError, match="does not match the SHA-256") as info:
            client.fetch(good)
        assert info.value.code == "hash_mismatch" and client.installed(good.release) is None
        stored.write_bytes(original[:-10])
        with pytest.raises(rc.ReleaseRefusedError, match="manifest gives") as info:
            client.fetch(good)
        assert info.value.code == "truncated" and client.installed(good.release) is None
    finally:
        stored.write_bytes(original)
    assert client.fetch(good).release == good.release  # the real one still installs


def test_a_full_disk_leaves_everything_as_it_was(served, tmp_path):
    store = tmp_path / "store"
    client = client_for(served, store, disk_free=lambda path: 1_000_000)
    announcement = client.announce()
    with pytest.raises(rc.ReleaseUnavailableError, match="free; the running model is untouched") as info:
        client.fetch(announcement)
    assert info.value.code == "disk_full" and client.bytes_downloaded == 0
    assert client.installed(announcement.release) is None


def test_the_server_refuses_unsigned_and_impersonating_rovers(served, tmp_path):
    stranger = client_for(served, tmp_path / "s")
    stranger.rover = rg.RoverInfo("rover_9")  # a rover the server has no key for
    with pytest.raises(rc.ReleaseUnavailableError, match="HTTP 401: rover 'rover_9' has no key"):
        stranger.announce()
    unsigned = client_for(served, tmp_path / "u", signed=False)
    with pytest.raises(rc.ReleaseUnavailableError, match="HTTP 401: unsigned request"):
        unsigned.announce()
    impostor = client_for(served, tmp_path / "i", rover="rover_0")
    impostor.rover = rg.RoverInfo("rover_1")  # signs as rover_0's key under rover_1's name
    with pytest.raises(rc.ReleaseUnavailableError, match="HTTP 401: bad signature for rover 'rover_1'"):
        impostor.announce()
    with pytest.raises(rc.ReleaseUnavailableError, match="HTTP 400: report kind"):
        client_for(served, tmp_path / "r").report(served["release"], "great")


# ---------------------------------------------------------------------------------------------- command line


def test_forest_fl_release_commands(tmp_path, capsys):
    from forest_perception.collab.flower.cli import main

    reg = ["--registry", str(tmp_path / "reg")]
    assert main(["release", "create", SMALL, *reg]) == 0
    out = capsys.readouterr().out
    assert "made the release signing key" in out and f"created r0001-{SMALL}" in out and "for pi4,pc" in out
    assert main(["release", "promote", "1", "--groups", "north", "--canary", "25", *reg]) == 0
    assert "stages 25 %, 100 %" in capsys.readouterr().out
    assert main(["release", "status", *reg, "--plot", str(tmp_path / "timeline.png")]) == 0
    out = capsys.readouterr().out
    assert "groups north: active, stage 1/2 (25 %)" in out and (tmp_path / "timeline.png").stat().st_size > 5000
    assert main(["release", "rollback", "r0001", "--reason", "bad", *reg]) == 0
    assert main(["release", "list", *reg]) == 0
    assert "rolled_back" in capsys.readouterr().out
    # bad input: one line naming the problem, exit 2, nothing changed
    assert main(["release", "promote", "7", *reg]) == 2
    assert "no release '7'" in capsys.readouterr().err
    assert main(["release", "create", str(tmp_path / "none.onnx"), *reg]) == 2
    assert "not an existing .onnx file" in capsys.readouterr().err
    assert main(["release", "promote", "1", "--stages", "50,20", *reg]) == 2
    assert "increasing percentages" in capsys.readouterr().err
    assert main(["release", "create", "nonesuch_model", *reg]) == 2
    assert "no shipped model 'nonesuch_model'" in capsys.readouterr().err
    assert len(rg.ReleaseRegistry(tmp_path / "reg").releases()) == 1
