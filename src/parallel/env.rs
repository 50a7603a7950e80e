//! Defaults taken from the environment, as joblib's `parallel_config`
//! gives a default to every `Parallel` made inside it: `PROCJOB_N_JOBS`
//! and `PROCJOB_MAX_NBYTES`, read when a [`Parallel`](super::Parallel) is
//! made. (`PROCJOB_TEMP_FOLDER` is read by [`crate::run_folder`], and
//! checked at the start of each call on workers.) A setting made on the
//! builder wins over the variable; a bad value is reported by the first
//! call that would use it, naming the variable.

/// The default for `n_jobs`.
pub(super) const N_JOBS_ENV: &str = "PROCJOB_N_JOBS";
/// The default for `max_nbytes`.
pub(super) const MAX_NBYTES_ENV: &str = "PROCJOB_MAX_NBYTES";

/// A setting the environment gives a default for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Setting {
    /// `n_jobs`, from [`N_JOBS_ENV`].
    NJobs,
    /// `max_nbytes`, from [`MAX_NBYTES_ENV`].
    MaxNbytes,
}

/// A variable whose value cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadVariable {
    /// The setting it was to give.
    pub(super) setting: Setting,
    /// The message, naming the variable and its value.
    pub(super) message: String,
}

/// What the environment says, read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct EnvDefaults {
    /// `n_jobs`, when the variable is set to a usable value.
    pub(super) n_jobs: Option<i64>,
    /// `max_nbytes`, when the variable is set to a usable value (`Some(None)`: never dump).
    pub(super) max_nbytes: Option<Option<usize>>,
    /// The variables set to values that cannot be used.
    pub(super) bad: Vec<BadVariable>,
}

impl EnvDefaults {
    /// Reads the variables of this process's environment.
    pub(super) fn read() -> EnvDefaults {
        EnvDefaults::from_values(std::env::var(N_JOBS_ENV).ok(), std::env::var(MAX_NBYTES_ENV).ok())
    }

    /// The defaults the two values (`None`: unset) give.
    pub(super) fn from_values(n_jobs: Option<String>, max_nbytes: Option<String>) -> EnvDefaults {
        let mut env = EnvDefaults::default();
        if let Some(v) = n_jobs {
            match parse_n_jobs(&v) {
                Ok(n) => env.n_jobs = n,
                Err(why) => env.bad.push(BadVariable {
                    setting: Setting::NJobs,
                    message: format!("{N_JOBS_ENV}={v:?} cannot be used: {why}"),
                }),
            }
        }
        if let Some(v) = max_nbytes {
            match parse_max_nbytes(&v) {
                Ok(m) => env.max_nbytes = m,
                Err(why) => env.bad.push(BadVariable {
                    setting: Setting::MaxNbytes,
                    message: format!("{MAX_NBYTES_ENV}={v:?} cannot be used: {why}"),
                }),
            }
        }
        env
    }
}

/// `n_jobs` as joblib writes it: a non-zero integer (negative counts back
/// from the CPUs), or `None` (and an empty value) for the default.
fn parse_n_jobs(value: &str) -> Result<Option<i64>, String> {
    let v = value.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match v.parse::<i64>() {
        Ok(0) => Err("n_jobs = 0 is not allowed: use a positive count, or -1 for all CPUs".into()),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err("expected a non-zero integer such as 4 or -1, or None".into()),
    }
}

/// `max_nbytes` as joblib writes it: bytes (`1048576`), a number with a
/// unit `K`, `M` or `G` (powers of 1024; `1M`, `0.5G`, either case), or
/// `None` to never dump; an empty value is the default.
fn parse_max_nbytes(value: &str) -> Result<Option<Option<usize>>, String> {
    const EXPECTED: &str = "expected a byte count such as 1048576, a size such as 100K, 1M or 2G, or None";
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.eq_ignore_ascii_case("none") {
        return Ok(Some(None));
    }
    let unit = match v.chars().last() {
        Some('k' | 'K') => 1u64 << 10,
        Some('m' | 'M') => 1 << 20,
        Some('g' | 'G') => 1 << 30,
        _ => return v.parse::<usize>().map(|n| Some(Some(n))).map_err(|_| EXPECTED.to_string()),
    };
    let number: f64 = v[..v.len() - 1].trim().parse().map_err(|_| EXPECTED.to_string())?;
    let bytes = number * unit as f64;
    if !number.is_finite() || number < 0.0 || bytes >= usize::MAX as f64 {
        return Err(EXPECTED.to_string());
    }
    Ok(Some(Some(bytes as usize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(n_jobs: Option<&str>, max_nbytes: Option<&str>) -> EnvDefaults {
        EnvDefaults::from_values(n_jobs.map(Into::into), max_nbytes.map(Into::into))
    }

    #[test]
    fn joblib_forms_of_max_nbytes_are_read() {
        assert_eq!(of(None, Some("1M")).max_nbytes, Some(Some(1 << 20)));
        assert_eq!(of(None, Some("100k")).max_nbytes, Some(Some(100 << 10)));
        assert_eq!(of(None, Some("0.5G")).max_nbytes, Some(Some(1 << 29)));
        assert_eq!(of(None, Some("4096")).max_nbytes, Some(Some(4096)));
        assert_eq!(of(None, Some("None")).max_nbytes, Some(None));
        assert_eq!(of(None, Some("")).max_nbytes, None);
        assert_eq!(of(None, None), EnvDefaults::default());
    }

    #[test]
    fn n_jobs_is_a_non_zero_integer_or_none() {
        assert_eq!(of(Some("3"), None).n_jobs, Some(3));
        assert_eq!(of(Some(" -1 "), None).n_jobs, Some(-1));
        assert_eq!(of(Some("None"), None).n_jobs, None);
        assert!(of(Some("None"), None).bad.is_empty());
    }

    #[test]
    fn a_bad_value_names_the_variable_and_the_value() {
        let env = of(Some("0"), Some("12Q"));
        assert_eq!(env.bad.len(), 2);
        assert_eq!(env.bad[0].setting, Setting::NJobs);
        assert!(env.bad[0].message.starts_with("PROCJOB_N_JOBS=\"0\" cannot be used: n_jobs = 0"), "{:?}", env.bad);
        assert_eq!(env.bad[1].setting, Setting::MaxNbytes);
        assert!(env.bad[1].message.starts_with("PROCJOB_MAX_NBYTES=\"12Q\" cannot be used: expected"), "{:?}", env.bad);
        for bad in ["two", "-1M", "1.5", "M", "infM"] {
            assert!(!of(Some(bad), Some(bad)).bad.is_empty(), "{bad}");
        }
    }
}
