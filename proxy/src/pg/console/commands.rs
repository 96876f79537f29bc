//! The admin console's commands, as PgBouncer's console reads them:
//! case-insensitive words, an optional trailing `;`.

use rouse_control_api::{DbKey, Name};

pub(crate) use super::stats::StatsTable;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Show(Show),
    /// Hold new sessions of one database (or all) until RESUME.
    Pause(Option<DbKey>),
    Resume(Option<DbKey>),
    /// Close pooled server connections (idle ones now, the others when
    /// returned), so that new ones are made.
    Reconnect(Option<DbKey>),
    /// Close every client and server connection of a database now.
    Kill(DbKey),
    /// Read the configuration file again, as `kill -HUP` does.
    Reload,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Show {
    Help,
    Pools,
    Clients,
    Servers,
    Databases,
    Stats(StatsTable),
    Wakes,
    Version,
}

/// The longest command the console reads.
pub(crate) const MAX_COMMAND: usize = 1024;

/// A command, or what is wrong with it (for the client).
pub(crate) fn parse(text: &str) -> Result<Command, String> {
    if text.len() > MAX_COMMAND {
        return Err("command too long".into());
    }
    let text = text.trim().trim_end_matches(';').trim();
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let db = |name: Option<&&str>| -> Result<Option<DbKey>, String> {
        name.map(|n| database(n)).transpose()
    };
    match words.as_slice() {
        ["show", what] => Ok(Command::Show(match *what {
            "help" => Show::Help,
            "pools" => Show::Pools,
            "clients" => Show::Clients,
            "servers" => Show::Servers,
            "stats" => Show::Stats(StatsTable::Both),
            "stats_totals" => Show::Stats(StatsTable::Totals),
            "stats_averages" => Show::Stats(StatsTable::Averages),
            "databases" => Show::Databases,
            "wakes" => Show::Wakes,
            "version" => Show::Version,
            other => return Err(format!("unknown SHOW {other}: try SHOW HELP")),
        })),
        ["pause", rest @ ..] if rest.len() <= 1 => Ok(Command::Pause(db(rest.first())?)),
        ["resume", rest @ ..] if rest.len() <= 1 => Ok(Command::Resume(db(rest.first())?)),
        ["reconnect", rest @ ..] if rest.len() <= 1 => Ok(Command::Reconnect(db(rest.first())?)),
        ["kill", name] => Ok(Command::Kill(database(name)?)),
        ["reload"] => Ok(Command::Reload),
        [] => Err("empty command: try SHOW HELP".into()),
        _ => Err(format!("unknown command \"{text}\": try SHOW HELP")),
    }
}

/// A database as the console names it: `<app>_<db>`, the name in metrics
/// and logs (`_` is in neither part, so the split is unambiguous).
fn database(name: &str) -> Result<DbKey, String> {
    let bad = || format!("invalid database \"{name}\": name it <app>_<db>");
    let (app, db) = name.split_once('_').ok_or_else(bad)?;
    Ok(DbKey::new(
        Name::new(app).map_err(|_| bad())?,
        Name::new(db).map_err(|_| bad())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pgbouncer_commands_parse_as_its_console_reads_them() {
        assert_eq!(parse("SHOW POOLS;"), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("  show   clients "), Ok(Command::Show(Show::Clients)));
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(
            parse("show stats_totals"),
            Ok(Command::Show(Show::Stats(StatsTable::Totals)))
        );
        let key = DbKey::new(Name::new("shop").unwrap(), Name::new("main").unwrap());
        assert_eq!(
            parse("pause shop_main;"),
            Ok(Command::Pause(Some(key.clone())))
        );
        assert_eq!(parse("KILL shop_main"), Ok(Command::Kill(key)));
        assert_eq!(parse("RELOAD"), Ok(Command::Reload));
        assert!(parse("KILL").is_err());
        assert!(parse("pause ../etc").is_err());
        assert!(parse("SHOW secrets").is_err());
        assert!(parse("DROP TABLE x").is_err());
        assert!(parse(&"x".repeat(MAX_COMMAND + 1)).is_err());
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused(text in ".{0,80}") {
            let _ = parse(&text);
        }
    }
}
