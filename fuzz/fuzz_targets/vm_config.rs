//! Fuzzes the monitor's user-facing configuration parsers: the `--config` JSON of
//! `vmm run` (`VmConfig::from_json`), the `--drive`, `--net` and `--slo` spec strings,
//! MAC addresses, and `vmm host`'s host.json. The first input byte picks the parser, the
//! rest is its text. None may panic; every refusal must name a field and a problem, which
//! is what the operator sees (`vmm: error: FIELD: PROBLEM`).
//!
//! The checks that open files (`VmConfig::validate`: kernel, drive images) are left out:
//! they depend on the machine's files, not on the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config::{parse_mac, parse_slo, ConfigError, DriveConfig, NetworkConfig, VmConfig};

fn named(e: &ConfigError) {
    assert!(!e.field.is_empty(), "refusal without a field: {e:?}");
    assert!(!e.problem.is_empty(), "refusal without a problem: {e:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 6 {
        0 => match VmConfig::from_json(text) {
            // What parses must survive a round trip through the operator's view of it.
            Ok(cfg) => {
                let _ = (cfg.start_vcpus(), cfg.tuner_on());
                for i in 0..cfg.drives.len() {
                    let _ = cfg.drive_id(i);
                    if let Err(e) = cfg.drives[i].start_limits() {
                        named(&e);
                    }
                }
            }
            Err(e) => named(&e),
        },
        1 => match DriveConfig::parse(text) {
            Ok(d) => {
                if let Err(e) = d.start_limits() {
                    named(&e);
                }
            }
            Err(e) => named(&e),
        },
        2 => {
            if let Err(e) = NetworkConfig::parse(text) {
                named(&e);
            }
        }
        3 => {
            if let Err(e) = parse_slo(text) {
                named(&e);
            }
        }
        4 => {
            if let Err(e) = parse_mac(text) {
                named(&e);
            }
        }
        _ => {
            if let Err(e) = vmm::host::config::HostConfig::from_json(text) {
                named(&e);
            }
        }
    }
});
