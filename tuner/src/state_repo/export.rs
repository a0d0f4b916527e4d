//! Exports for training outside this project: CSV and (feature `parquet`) Parquet, with
//! the storage columns, then `v_<feature>` (normalised) and `raw_<feature>` columns in
//! schema order.

use std::io::Write;

use super::row::StoredRow;
use super::RepoError;
use crate::schema::FEATURES;

pub(crate) fn export_columns() -> Vec<String> {
    let mut cols: Vec<String> = [
        "id",
        "vm_id",
        "ts_ns",
        "wall_ns",
        "interval_ns",
        "schema_version",
        "policy_id",
        "action",
        "reward",
        "anomaly",
        "anomaly_score",
        "config",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cols.extend(FEATURES.iter().map(|f| format!("v_{}", f.name)));
    cols.extend(FEATURES.iter().map(|f| format!("raw_{}", f.name)));
    cols
}

/// Quotes a CSV field when it holds a comma, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes `rows` as CSV lines (no header) to `out`.
pub(crate) fn write_csv_rows(out: &mut impl Write, rows: &[StoredRow]) -> Result<(), RepoError> {
    for s in rows {
        let r = &s.row;
        let mut fields: Vec<String> = vec![
            s.id.to_string(),
            csv_field(&r.vm_id),
            r.ts_ns.to_string(),
            s.wall_ns.to_string(),
            r.interval_ns.to_string(),
            r.schema_version.to_string(),
            csv_field(&r.policy_id),
            r.action.as_deref().map(csv_field).unwrap_or_default(),
            r.reward.map(|x| x.to_string()).unwrap_or_default(),
            r.anomaly.map(|a| (a as u8).to_string()).unwrap_or_default(),
            r.anomaly_score.map(|x| x.to_string()).unwrap_or_default(),
            csv_field(&r.config),
        ];
        for i in 0..FEATURES.len() {
            fields.push(r.vector.get(i).map(|x| x.to_string()).unwrap_or_default());
        }
        for i in 0..FEATURES.len() {
            fields.push(r.raw.get(i).map(|x| x.to_string()).unwrap_or_default());
        }
        writeln!(out, "{}", fields.join(","))?;
    }
    Ok(())
}

#[cfg(feature = "parquet")]
pub(crate) mod parquet_export {
    use std::fs::File;
    use std::path::Path;
    use std::sync::Arc;

    use parquet::data_type::{
        BoolType, ByteArray, ByteArrayType, DataType, DoubleType, FloatType, Int32Type, Int64Type,
    };
    use parquet::errors::ParquetError;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
    use parquet::schema::parser::parse_message_type;

    use super::export_columns;
    use crate::schema::FEATURES;
    use crate::state_repo::row::{to_i64, StoredRow};
    use crate::state_repo::RepoError;

    impl From<ParquetError> for RepoError {
        fn from(e: ParquetError) -> Self {
            RepoError::Parquet(e.to_string())
        }
    }

    /// The Parquet schema: the columns of [`export_columns`] with their types.
    pub(super) fn message_type() -> String {
        let cols = export_columns();
        let types = [
            "REQUIRED INT64",
            "REQUIRED BYTE_ARRAY",
            "REQUIRED INT64",
            "REQUIRED INT64",
            "REQUIRED INT64",
            "REQUIRED INT32",
            "REQUIRED BYTE_ARRAY",
            "OPTIONAL BYTE_ARRAY",
            "OPTIONAL DOUBLE",
            "OPTIONAL BOOLEAN",
            "OPTIONAL DOUBLE",
            "REQUIRED BYTE_ARRAY",
        ];
        let mut s = String::from("message samples {\n");
        for (i, name) in cols.iter().enumerate() {
            let ty = types
                .get(i)
                .copied()
                .unwrap_or(if i < types.len() + FEATURES.len() {
                    "OPTIONAL FLOAT"
                } else {
                    "OPTIONAL DOUBLE"
                });
            let utf8 = if ty.ends_with("BYTE_ARRAY") {
                " (UTF8)"
            } else {
                ""
            };
            s.push_str(&format!("  {ty} {name}{utf8};\n"));
        }
        s.push('}');
        s
    }

    pub(super) struct ParquetOut {
        writer: SerializedFileWriter<File>,
    }

    fn req<T: DataType>(
        cw: &mut SerializedColumnWriter<'_>,
        values: Vec<T::T>,
    ) -> Result<(), ParquetError> {
        cw.typed::<T>().write_batch(&values, None, None)?;
        Ok(())
    }

    fn opt<T: DataType>(
        cw: &mut SerializedColumnWriter<'_>,
        values: Vec<Option<T::T>>,
    ) -> Result<(), ParquetError> {
        let defs: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
        let present: Vec<T::T> = values.into_iter().flatten().collect();
        cw.typed::<T>().write_batch(&present, Some(&defs), None)?;
        Ok(())
    }

    fn text(s: &str) -> ByteArray {
        ByteArray::from(s.as_bytes().to_vec())
    }

    impl ParquetOut {
        pub(super) fn create(path: &Path) -> Result<Self, RepoError> {
            let schema = Arc::new(parse_message_type(&message_type())?);
            let props = Arc::new(WriterProperties::builder().build());
            let file = File::create(path)?;
            Ok(Self {
                writer: SerializedFileWriter::new(file, schema, props)?,
            })
        }

        pub(super) fn write_group(&mut self, rows: &[StoredRow]) -> Result<(), RepoError> {
            let n = FEATURES.len();
            let mut group = self.writer.next_row_group()?;
            let mut col = 0usize;
            while let Some(mut cw) = group.next_column()? {
                let w = &mut cw;
                match col {
                    0 => req::<Int64Type>(w, rows.iter().map(|s| s.id).collect())?,
                    1 => {
                        req::<ByteArrayType>(w, rows.iter().map(|s| text(&s.row.vm_id)).collect())?
                    }
                    2 => req::<Int64Type>(w, rows.iter().map(|s| to_i64(s.row.ts_ns)).collect())?,
                    3 => req::<Int64Type>(w, rows.iter().map(|s| s.wall_ns).collect())?,
                    4 => req::<Int64Type>(
                        w,
                        rows.iter().map(|s| to_i64(s.row.interval_ns)).collect(),
                    )?,
                    5 => req::<Int32Type>(
                        w,
                        rows.iter()
                            .map(|s| i32::try_from(s.row.schema_version).unwrap_or(i32::MAX))
                            .collect(),
                    )?,
                    6 => req::<ByteArrayType>(
                        w,
                        rows.iter().map(|s| text(&s.row.policy_id)).collect(),
                    )?,
                    7 => opt::<ByteArrayType>(
                        w,
                        rows.iter()
                            .map(|s| s.row.action.as_deref().map(text))
                            .collect(),
                    )?,
                    8 => opt::<DoubleType>(w, rows.iter().map(|s| s.row.reward).collect())?,
                    9 => opt::<BoolType>(w, rows.iter().map(|s| s.row.anomaly).collect())?,
                    10 => opt::<DoubleType>(w, rows.iter().map(|s| s.row.anomaly_score).collect())?,
                    11 => {
                        req::<ByteArrayType>(w, rows.iter().map(|s| text(&s.row.config)).collect())?
                    }
                    c if c < 12 + n => {
                        let f = c - 12;
                        opt::<FloatType>(
                            w,
                            rows.iter().map(|s| s.row.vector.get(f).copied()).collect(),
                        )?
                    }
                    c => {
                        let f = c - 12 - n;
                        opt::<DoubleType>(
                            w,
                            rows.iter().map(|s| s.row.raw.get(f).copied()).collect(),
                        )?
                    }
                }
                cw.close()?;
                col += 1;
            }
            group.close()?;
            Ok(())
        }

        pub(super) fn close(self) -> Result<(), RepoError> {
            self.writer.close()?;
            Ok(())
        }
    }
}
