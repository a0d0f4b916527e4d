//! From a trained network to what the tuner loads: the ONNX bytes, the model card, and
//! the check that tract computes the trainer's Q-values.
//!
//! [`write_verified`] writes `NAME.onnx` and `NAME.card.json` under temporary names in the
//! destination directory, loads them back with [`OnnxPolicy::load`] (the tuner's own
//! loader: card validation, shapes, the reference Q-values), compares tract's Q-values
//! with the trainer's on a batch of states, and only then renames both into place. A
//! model that tract computes differently is never left behind.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use tuner::actions::{ActionSpace, ACTIONS_VERSION};
use tuner::policy::{Evaluation, ModelCard, OnnxPolicy, QNetwork, ShapeRange, REFERENCE_TOLERANCE};
use tuner::reward::RewardWeights;
use tuner::schema::{Schema, SCHEMA_VERSION};

use crate::error::LearnError;

/// How closely tract reproduced the trainer's Q-values.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Agreement {
    /// States compared.
    pub states: usize,
    /// Largest absolute difference.
    pub max_abs: f32,
    /// Largest difference relative to the trainer's value's magnitude (absolute below 1).
    pub max_rel: f32,
}

/// A model card for a network over the action layout of `space` (input: the schema's
/// vector), serving every VM shape of the layout ([`ShapeRange::LAYOUT`]: the masks keep
/// a policy to the devices and vCPU bounds of the VM it runs on), with an empty
/// evaluation for the caller to fill.
pub fn card(
    name: &str,
    description: &str,
    space: &ActionSpace,
    reward_weights: RewardWeights,
    trained_on: String,
) -> ModelCard {
    ModelCard {
        name: name.to_string(),
        description: description.to_string(),
        schema_version: SCHEMA_VERSION,
        input_size: Schema::len(),
        output_size: space.len(),
        actions_version: ACTIONS_VERSION,
        actions: space.names().to_vec(),
        reward_version: tuner::reward::REWARD_VERSION,
        reward_weights,
        trained_on,
        evaluation: Evaluation::default(),
        forecast: None,
        start: None,
        schema: Some(Schema::spec()),
        serves: Some(ShapeRange::LAYOUT),
    }
}

/// Compares tract's Q-values (through `policy`) with the trainer's `ours` for `states`;
/// errors on the first difference beyond [`REFERENCE_TOLERANCE`] (relative to the
/// trainer's value, absolute below 1).
pub fn compare(
    policy: &mut dyn QNetwork,
    space: &ActionSpace,
    states: &[Vec<f32>],
    ours: &[Vec<f32>],
) -> Result<Agreement, LearnError> {
    let mut agreement = Agreement {
        states: states.len(),
        ..Agreement::default()
    };
    for (state, (input, expected)) in states.iter().zip(ours).enumerate() {
        let got = policy.q_values(input).map_err(LearnError::Reload)?;
        if got.len() != expected.len() {
            return Err(LearnError::Reload(
                tuner::policy::PolicyError::OutputLength {
                    expected: expected.len(),
                    got: got.len(),
                },
            ));
        }
        for (index, (t, o)) in got.iter().zip(expected).enumerate() {
            let abs = (t - o).abs();
            let rel = abs / o.abs().max(1.0);
            agreement.max_abs = agreement.max_abs.max(abs);
            agreement.max_rel = agreement.max_rel.max(rel);
            // A NaN difference fails too.
            if rel.is_nan() || rel > REFERENCE_TOLERANCE {
                return Err(LearnError::Mismatch {
                    state,
                    action: space.name(index).unwrap_or("?").to_string(),
                    ours: *o,
                    tract: *t,
                    tolerance: REFERENCE_TOLERANCE,
                });
            }
        }
    }
    Ok(agreement)
}

/// Loads `bytes` with `card` through tract in memory ([`OnnxPolicy::from_parts`]) and
/// compares its Q-values with the trainer's.
pub fn verify_bytes(
    bytes: &[u8],
    card: &ModelCard,
    space: &ActionSpace,
    states: &[Vec<f32>],
    ours: &[Vec<f32>],
) -> Result<Agreement, LearnError> {
    card.validate(space, Some(&card.reward_weights))
        .map_err(|source| {
            LearnError::Reload(tuner::policy::PolicyError::Card {
                path: PathBuf::from(format!("{}.card.json", card.name)),
                source,
            })
        })?;
    let mut policy = OnnxPolicy::from_parts(
        Path::new(&format!("{}.onnx", card.name)),
        bytes,
        card.clone(),
    )
    .map_err(LearnError::Reload)?;
    compare(&mut policy, space, states, ours)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LearnError + '_ {
    move |source| LearnError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A card as the trainer writes it (pretty JSON, newline at the end).
pub(crate) fn card_json(card: &ModelCard) -> Result<Vec<u8>, LearnError> {
    let mut text = serde_json::to_vec_pretty(card)
        .map_err(|e| LearnError::Export(format!("model card: {e}")))?;
    text.push(b'\n');
    Ok(text)
}

/// Removes the temporary files when dropped (unless disarmed).
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes `out` (`NAME.onnx`) and its card (`NAME.card.json`) after checking them through
/// tract as the tuner loads them; the card gets the agreement figures under
/// `evaluation.tract_check`. Nothing is left at `out` on failure.
pub fn write_verified(
    out: &Path,
    bytes: &[u8],
    mut card: ModelCard,
    space: &ActionSpace,
    states: &[Vec<f32>],
    ours: &[Vec<f32>],
) -> Result<Agreement, LearnError> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp_model = dir.join(format!(".{stem}.tmp{}.onnx", std::process::id()));
    let tmp_card = ModelCard::path_for(&tmp_model);
    let mut temps = TempFiles(vec![tmp_model.clone(), tmp_card.clone()]);
    fs::write(&tmp_model, bytes).map_err(io(&tmp_model))?;
    fs::write(&tmp_card, card_json(&card)?).map_err(io(&tmp_card))?;

    let mut policy = OnnxPolicy::load(&tmp_model, space, Some(&card.reward_weights))
        .map_err(LearnError::Reload)?;
    let agreement = compare(&mut policy, space, states, ours)?;
    log::info!(
        "tract reproduces the trainer's Q-values on {} states: max |dq| {:e}, max relative {:e}",
        agreement.states,
        agreement.max_abs,
        agreement.max_rel
    );
    card.evaluation.extra.insert(
        "tract_check".into(),
        json!({
            "states": agreement.states,
            "max_abs_diff": agreement.max_abs,
            "max_rel_diff": agreement.max_rel,
            "tolerance_rel": REFERENCE_TOLERANCE,
        }),
    );
    fs::write(&tmp_card, card_json(&card)?).map_err(io(&tmp_card))?;
    let card_path = ModelCard::path_for(out);
    fs::rename(&tmp_model, out).map_err(io(out))?;
    fs::rename(&tmp_card, &card_path).map_err(io(&card_path))?;
    temps.0.clear();
    Ok(agreement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_catches_a_difference_beyond_the_tolerance() {
        let space = ActionSpace::new(tuner::actions::VmShape::new(2, 1, 0));
        let mut p = FixedPolicy(vec![0.0; space.len()]);
        // A network's own Q-values match exactly.
        let state = vec![0.0; Schema::len()];
        let ours = p.q_values(&state).unwrap();
        let a = compare(
            &mut p,
            &space,
            std::slice::from_ref(&state),
            std::slice::from_ref(&ours),
        )
        .unwrap();
        assert_eq!((a.states, a.max_abs, a.max_rel), (1, 0.0, 0.0));
        let mut off = ours.clone();
        off[2] += 2e-4;
        let e = compare(&mut p, &space, std::slice::from_ref(&state), &[off]).unwrap_err();
        assert!(
            matches!(&e, LearnError::Mismatch { state: 0, action, .. } if action == "vcpu-1"),
            "{e}"
        );
        // Relative above 1 in magnitude: 1e-4 of 1000 is 0.1.
        let mut big = ours.clone();
        big[3] = 1000.0;
        let mut near = vec![ours.clone()];
        near[0][3] = 1000.05;
        let mut fixed = FixedPolicy(big);
        compare(&mut fixed, &space, std::slice::from_ref(&state), &near).unwrap();
        let e = compare(&mut fixed, &space, &[state], &[ours]).unwrap_err();
        assert!(matches!(e, LearnError::Mismatch { .. }), "{e}");
    }

    struct FixedPolicy(Vec<f32>);

    impl QNetwork for FixedPolicy {
        fn id(&self) -> &str {
            "fixed"
        }
        fn q_values(&mut self, _input: &[f32]) -> Result<Vec<f32>, tuner::policy::PolicyError> {
            Ok(self.0.clone())
        }
    }
}
