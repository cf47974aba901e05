//! Fragmented MP4 (ISO BMFF) for recordings, boxes from the `mp4-atom` crate: an init segment
//! (`ftyp` + `moov` with the stream's SPS and PPS in `avcC`), then one `moof` + `mdat` per
//! picture. Every fragment is complete when written, so a file cut anywhere after the init
//! segment plays up to its last whole fragment (a killed sidecar leaves a playable file).

use anyhow::{Context, Result, bail};
use mp4_atom::{
    Avc1, Avcc, Dinf, Dref, Encode, Ftyp, Hdlr, Matrix, Mdat, Mdhd, Mdia, Mfhd, Minf, Moof, Moov,
    Mvex, Mvhd, Stbl, Stco, Stsc, Stsd, Stsz, Stts, Tfdt, Tfhd, Tkhd, Traf, Trak, Trex, Trun,
    TrunEntry, TrunSamples, Url, Visual, Vmhd,
};

/// Media time units per second (milliseconds).
pub const TIMESCALE: u32 = 1000;
const TRACK: u32 = 1;
/// `sample_depends_on = 2` (an IDR depends on nothing).
const KEY_FLAGS: u32 = 0x0200_0000;
/// `sample_depends_on = 1`, `sample_is_non_sync_sample`.
const DELTA_FLAGS: u32 = 0x0101_0000;

/// The NAL units of an Annex B stream (start codes removed).
pub fn nal_units(annex_b: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= annex_b.len() {
        if annex_b[i] == 0 && annex_b[i + 1] == 0 && annex_b[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (n, &(_, body)) in starts.iter().enumerate() {
        let mut end = starts.get(n + 1).map_or(annex_b.len(), |&(s, _)| s);
        // A four-byte start code's leading zero belongs to no unit.
        while end > body && annex_b[end - 1] == 0 && n + 1 < starts.len() {
            end -= 1;
        }
        if end > body {
            out.push(&annex_b[body..end]);
        }
    }
    out
}

fn nal_type(unit: &[u8]) -> u8 {
    unit.first().map_or(0, |b| b & 0x1f)
}

/// The init segment for a `width`x`height` stream whose key frame is `key` (Annex B with SPS
/// and PPS).
pub fn init_segment(width: u32, height: u32, key: &[u8]) -> Result<Vec<u8>> {
    let units = nal_units(key);
    let sps = units
        .iter()
        .find(|u| nal_type(u) == 7)
        .context("key frame without SPS")?;
    let pps = units
        .iter()
        .find(|u| nal_type(u) == 8)
        .context("key frame without PPS")?;
    if sps.len() < 4 {
        bail!("SPS of {} bytes", sps.len());
    }
    let (w, h) = (
        u16::try_from(width).context("width")?,
        u16::try_from(height).context("height")?,
    );
    let ftyp = Ftyp {
        major_brand: b"isom".into(),
        minor_version: 512,
        compatible_brands: vec![
            b"isom".into(),
            b"iso6".into(),
            b"avc1".into(),
            b"mp41".into(),
        ],
    };
    let matrix = Matrix {
        a: 0x0001_0000,
        b: 0,
        u: 0,
        c: 0,
        d: 0x0001_0000,
        v: 0,
        x: 0,
        y: 0,
        w: 0x4000_0000,
    };
    let avc1 = Avc1 {
        visual: Visual {
            data_reference_index: 1,
            width: w,
            height: h,
            horizresolution: 72.into(),
            vertresolution: 72.into(),
            frame_count: 1,
            compressor: "vdi-sidecar".into(),
            depth: 24,
        },
        avcc: Avcc {
            configuration_version: 1,
            avc_profile_indication: sps[1],
            profile_compatibility: sps[2],
            avc_level_indication: sps[3],
            length_size: 4,
            sequence_parameter_sets: vec![sps.to_vec()],
            picture_parameter_sets: vec![pps.to_vec()],
            ext: None,
        },
        btrt: None,
        colr: None,
        pasp: None,
        taic: None,
        fiel: None,
        spatial: Default::default(),
    };
    let moov = Moov {
        mvhd: Mvhd {
            creation_time: 0,
            modification_time: 0,
            timescale: TIMESCALE,
            duration: 0,
            rate: 1.into(),
            volume: 1.into(),
            matrix: matrix.clone(),
            next_track_id: TRACK + 1,
        },
        mvex: Some(Mvex {
            mehd: None,
            trex: vec![Trex {
                track_id: TRACK,
                default_sample_description_index: 1,
                default_sample_duration: 0,
                default_sample_size: 0,
                default_sample_flags: 0,
            }],
        }),
        trak: vec![Trak {
            tkhd: Tkhd {
                creation_time: 0,
                modification_time: 0,
                track_id: TRACK,
                duration: 0,
                layer: 0,
                alternate_group: 0,
                enabled: true,
                in_movie: true,
                size_is_aspect_ratio: false,
                volume: 0.into(),
                matrix,
                width: w.into(),
                height: h.into(),
            },
            mdia: Mdia {
                mdhd: Mdhd {
                    creation_time: 0,
                    modification_time: 0,
                    timescale: TIMESCALE,
                    duration: 0,
                    language: "und".into(),
                },
                hdlr: Hdlr {
                    handler: b"vide".into(),
                    name: "vdi-sidecar console".into(),
                },
                minf: Minf {
                    vmhd: Some(Vmhd::default()),
                    dinf: Dinf {
                        dref: Dref {
                            entries: vec![Url::default().into()],
                        },
                    },
                    stbl: Stbl {
                        stsd: Stsd {
                            codecs: vec![avc1.into()],
                        },
                        stts: Stts::default(),
                        stsc: Stsc::default(),
                        stsz: Stsz::default(),
                        stco: Some(Stco::default()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            },
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut out = Vec::new();
    ftyp.encode(&mut out).context("ftyp")?;
    moov.encode(&mut out).context("moov")?;
    Ok(out)
}

/// One picture as a fragment: `seq` counts fragments from 1, `start` and `duration` are in
/// [`TIMESCALE`] units. SPS and PPS stay in the init segment; the other units are written
/// length-prefixed.
pub fn fragment(seq: u32, start: u64, duration: u32, key: bool, annex_b: &[u8]) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(annex_b.len() + 16);
    for unit in nal_units(annex_b) {
        if matches!(nal_type(unit), 7 | 8) {
            continue;
        }
        let len = u32::try_from(unit.len()).context("NAL unit over 4 GiB")?;
        data.extend_from_slice(&len.to_be_bytes());
        data.extend_from_slice(unit);
    }
    let size = u32::try_from(data.len()).context("picture over 4 GiB")?;
    let moof = |offset: i32| Moof {
        mfhd: Mfhd {
            sequence_number: seq,
        },
        traf: vec![Traf {
            tfhd: Tfhd {
                track_id: TRACK,
                default_base_is_moof: true,
                ..Default::default()
            },
            tfdt: Some(Tfdt {
                base_media_decode_time: start,
            }),
            trun: vec![Trun {
                data_offset: Some(offset),
                samples: TrunSamples::Explicit(vec![TrunEntry {
                    duration: Some(duration),
                    size: Some(size),
                    flags: Some(if key { KEY_FLAGS } else { DELTA_FLAGS }),
                    cts: None,
                }]),
            }],
            ..Default::default()
        }],
    };
    // The data offset counts from the start of `moof` to the first byte in `mdat`: encode once
    // to learn the box's size (the offset's value does not change it).
    let mut probe = Vec::new();
    moof(0).encode(&mut probe).context("moof")?;
    let offset = i32::try_from(probe.len() + 8).context("moof size")?;
    let mut out = Vec::with_capacity(probe.len() + 8 + data.len());
    moof(offset).encode(&mut out).context("moof")?;
    Mdat { data }.encode(&mut out).context("mdat")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framebuffer::{Framebuffer, Rect};
    use crate::h264::encoder::Encoder;
    use crate::pixman::X8R8G8B8;
    use mp4_atom::{Decode, Mdat, Moof, Moov};

    #[test]
    fn nal_units_split_on_three_and_four_byte_start_codes() {
        let s = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5,
        ];
        let u = nal_units(&s);
        assert_eq!(u, [&[0x67, 1, 2][..], &[0x68, 3], &[0x65, 4, 5]]);
        assert!(nal_units(&[0, 0]).is_empty());
    }

    /// A real stream's init segment and fragments decode back (mp4-atom), with the SPS in
    /// `avcC`, length-prefixed samples and a data offset that points into `mdat`.
    #[test]
    fn init_and_fragments_round_trip() {
        let fb = Framebuffer::new();
        let px: Vec<u8> = (0..64 * 48u32)
            .flat_map(|i| (i * 997).to_ne_bytes())
            .collect();
        fb.scanout(64, 48, 256, X8R8G8B8, &px).expect("scanout");
        let mut enc = Encoder::new(64, 48, 30.0).expect("encoder");
        let key = enc
            .encode(&fb, &[Rect::full(64, 48)])
            .expect("encode")
            .expect("picture");
        let init = init_segment(64, 48, &key.data).expect("init");
        let mut cur = std::io::Cursor::new(&init[..]);
        let _ftyp = Ftyp::decode(&mut cur).expect("ftyp");
        let moov = Moov::decode(&mut cur).expect("moov");
        assert_eq!(moov.trak[0].tkhd.width, 64.into());
        let frag = fragment(1, 0, 33, true, &key.data).expect("fragment");
        let mut cur = std::io::Cursor::new(&frag[..]);
        let moof = Moof::decode(&mut cur).expect("moof");
        let pos = cur.position() as usize;
        let mdat = Mdat::decode(&mut cur).expect("mdat");
        let trun = &moof.traf[0].trun[0];
        assert_eq!(trun.data_offset, Some(pos as i32 + 8));
        let sample = &mdat.data;
        let first = u32::from_be_bytes([sample[0], sample[1], sample[2], sample[3]]) as usize;
        assert!(first + 4 <= sample.len());
        assert_eq!(sample[4] & 0x1f, 5, "the IDR slice, SPS and PPS left out");
        assert!(init_segment(64, 48, &[0, 0, 1, 0x65, 1]).is_err(), "no SPS");
    }
}
