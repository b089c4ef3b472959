"""Audio decoding, resampling and noise mixing."""

import numpy as np
import pytest
import soundfile as sf

from distil.data.audio import AudioDecodeError, add_noise, decode_audio, encode_flac

pytestmark = pytest.mark.unit  # no model, no audio synthesis: `make test-unit`


def _tone(sr, seconds=0.5, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_decode_bytes_resamples_to_target_rate():
    wave = decode_audio({"bytes": encode_flac(_tone(8000), 8000), "path": None}, target_sr=16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 8000) <= 2  # 0.5 s at 16 kHz


def test_decode_path_downmixes_stereo(tmp_path):
    stereo = np.stack([_tone(16000), np.zeros(8000, np.float32)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000)
    wave = decode_audio(str(path))
    assert wave.shape == (8000,)
    np.testing.assert_allclose(wave, stereo.mean(axis=1), atol=1e-4)


def test_decoded_array_dict_passes_through():
    tone = _tone(16000)
    np.testing.assert_array_equal(decode_audio({"array": tone, "sampling_rate": 16000}), tone)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"bytes": b"not audio at all", "path": "clip_7.flac"}, "clip_7.flac"),
        ({"bytes": None, "path": None}, "neither bytes nor a path"),
        ("/nonexistent/file.wav", "/nonexistent/file.wav"),
    ],
)
def test_unreadable_audio_names_the_source(bad, fragment):
    with pytest.raises(AudioDecodeError, match=fragment.replace(".", r"\.")):
        decode_audio(bad)


def test_empty_audio_file_is_an_error(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_audio(str(path))


def test_add_noise_hits_requested_snr():
    rng = np.random.default_rng(0)
    clean = _tone(16000, seconds=2.0)
    noise = rng.standard_normal(16000).astype(np.float32)
    mixed = add_noise(clean, noise, snr_db=10.0)
    residual = mixed - clean
    snr = 10 * np.log10(np.mean(clean**2) / np.mean(residual**2))
    assert snr == pytest.approx(10.0, abs=0.1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_a_decode_error(tmp_path, bad):
    tone = _tone(16000)
    tone[100:103] = bad
    path = tmp_path / "clip.wav"
    sf.write(path, tone, 16000, subtype="FLOAT")  # float WAV keeps NaN/inf (FLAC's integers cannot)
    with pytest.raises(AudioDecodeError, match=rf"audio {path} has 3 non-finite \(NaN/inf\) samples of 8000"):
        decode_audio(str(path))
    with pytest.raises(AudioDecodeError, match="non-finite"):
        decode_audio({"array": tone, "sampling_rate": 16000})
