//! The function's IAM policy in `infra/template.yaml` grants exactly the DynamoDB,
//! Secrets Manager and SQS actions that the deployed code calls, and CloudWatch Logs only
//! `CreateLogStream` and `PutLogEvents`. No AWS account needed: both sides are read from
//! the files.
//!
//! - The template side is a purpose-built line scan (the crate has no YAML parser and
//!   takes no new dependency): the `AWS::Serverless::Function`, the role its `Role:`
//!   names (`!GetAtt X.Arn`), and every `Action:` (string, flow list or block list) under
//!   the `Policies:` of either. CloudFormation tags (`!If`, `!Sub`, `!Ref`) around the
//!   statements are fine; an action that is itself computed by a tag is refused, because
//!   it could not be checked.
//! - The code side scans `src/**/*.rs` with comments and literals blanked out, minus
//!   `#[cfg(test)]` items (inline modules, `mod tests;` files, functions) and minus
//!   [`TEST_ONLY_FUNCTIONS`]. Every `.operation()` call naming an operation of the SDK
//!   crate the file uses is an AWS call; `snake_case` maps to `service:PascalCase`, except
//!   `TransactWriteItems`, which IAM authorises as its parts (`Put` is `PutItem`,
//!   `ConditionCheck` is `ConditionCheckItem`, ...).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Functions in `src/` that make AWS calls the deployed function never makes: the file,
/// the function, and why it is left out of the policy.
const TEST_ONLY_FUNCTIONS: &[(&str, &str, &str)] = &[
    (
        "src/store/dynamo.rs",
        "create_table",
        "DynamoStore::create_table sets up the tables for the tests (through \
         create_tables); the SAM template creates the deployed tables, and nothing in src/ \
         outside tests calls it (checked below)",
    ),
    (
        "src/store/dynamo.rs",
        "create_tables",
        "DynamoStore::create_tables creates the state and change tables for the tests \
         (through create_one_table)",
    ),
    (
        "src/store/dynamo.rs",
        "create_one_table",
        "DynamoStore::create_one_table (CreateTable, DescribeTable, DescribeTimeToLive, \
         UpdateTimeToLive) creates one table for the tests",
    ),
];

/// The only file whose code touches the change table (`CHANGE_TABLE`).
const CHANGE_TABLE_FILE: &str = "src/store/dynamo/changes.rs";

/// DynamoDB operations of `aws-sdk-dynamodb` (the fluent method names of its client).
const DYNAMODB_OPERATIONS: &[&str] = &[
    "batch_execute_statement",
    "batch_get_item",
    "batch_write_item",
    "create_backup",
    "create_global_table",
    "create_table",
    "delete_backup",
    "delete_item",
    "delete_resource_policy",
    "delete_table",
    "describe_backup",
    "describe_continuous_backups",
    "describe_contributor_insights",
    "describe_endpoints",
    "describe_export",
    "describe_global_table",
    "describe_global_table_settings",
    "describe_import",
    "describe_kinesis_streaming_destination",
    "describe_limits",
    "describe_table",
    "describe_table_replica_auto_scaling",
    "describe_time_to_live",
    "disable_kinesis_streaming_destination",
    "enable_kinesis_streaming_destination",
    "execute_statement",
    "execute_transaction",
    "export_table_to_point_in_time",
    "get_item",
    "get_resource_policy",
    "import_table",
    "list_backups",
    "list_contributor_insights",
    "list_exports",
    "list_global_tables",
    "list_imports",
    "list_tables",
    "list_tags_of_resource",
    "put_item",
    "put_resource_policy",
    "query",
    "restore_table_from_backup",
    "restore_table_to_point_in_time",
    "scan",
    "tag_resource",
    "transact_get_items",
    "transact_write_items",
    "untag_resource",
    "update_continuous_backups",
    "update_contributor_insights",
    "update_global_table",
    "update_global_table_settings",
    "update_item",
    "update_kinesis_streaming_destination",
    "update_table",
    "update_table_replica_auto_scaling",
    "update_time_to_live",
];

/// Secrets Manager operations of `aws-sdk-secretsmanager`.
const SECRETSMANAGER_OPERATIONS: &[&str] = &[
    "batch_get_secret_value",
    "cancel_rotate_secret",
    "create_secret",
    "delete_resource_policy",
    "delete_secret",
    "describe_secret",
    "get_random_password",
    "get_resource_policy",
    "get_secret_value",
    "list_secret_version_ids",
    "list_secrets",
    "put_resource_policy",
    "put_secret_value",
    "remove_regions_from_replication",
    "replicate_secret_to_regions",
    "restore_secret",
    "rotate_secret",
    "stop_replication_to_replica",
    "tag_resource",
    "untag_resource",
    "update_secret",
    "update_secret_version_stage",
    "validate_resource_policy",
];

/// SQS operations of `aws-sdk-sqs`.
const SQS_OPERATIONS: &[&str] = &[
    "add_permission",
    "cancel_message_move_task",
    "change_message_visibility",
    "change_message_visibility_batch",
    "create_queue",
    "delete_message",
    "delete_message_batch",
    "delete_queue",
    "get_queue_attributes",
    "get_queue_url",
    "list_dead_letter_source_queues",
    "list_message_move_tasks",
    "list_queue_tags",
    "list_queues",
    "purge_queue",
    "receive_message",
    "remove_permission",
    "send_message",
    "send_message_batch",
    "set_queue_attributes",
    "start_message_move_task",
    "tag_queue",
    "untag_queue",
];

/// The IAM action of an SQS operation: the batch operations are authorised as their
/// single-message action (`SendMessageBatch` is `sqs:SendMessage`).
fn sqs_action(operation: &str) -> String {
    let single = operation.strip_suffix("_batch").unwrap_or(operation);
    format!("sqs:{}", pascal_case(single))
}

/// How IAM authorises the parts of a `TransactWriteItems`: the builder of each part and
/// the action it needs.
const TRANSACT_WRITE_PARTS: &[(&str, &str)] = &[
    ("Put", "dynamodb:PutItem"),
    ("Update", "dynamodb:UpdateItem"),
    ("Delete", "dynamodb:DeleteItem"),
    ("ConditionCheck", "dynamodb:ConditionCheckItem"),
];

/// The only CloudWatch Logs actions the function needs (its log group exists).
const LOGS_ACTIONS: &[&str] = &["logs:CreateLogStream", "logs:PutLogEvents"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn function_policy_grants_exactly_the_aws_calls_the_code_makes() {
    let template_path = root().join("infra/template.yaml");
    let template = std::fs::read_to_string(&template_path)
        .unwrap_or_else(|e| panic!("{}: {e}", template_path.display()));
    let granted = function_policy_actions(&template);
    let called = sdk_actions_in(&root());

    let mut problems = Vec::new();
    for service in ["dynamodb", "secretsmanager", "sqs"] {
        let prefix = format!("{service}:");
        let want: BTreeSet<&String> = called.iter().filter(|a| a.starts_with(&prefix)).collect();
        let have: BTreeSet<&String> = granted.iter().filter(|a| a.starts_with(&prefix)).collect();
        let missing: Vec<_> = want.difference(&have).collect();
        let extra: Vec<_> = have.difference(&want).collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{service}: called in src/ but not granted: {missing:?}"
            ));
        }
        if !extra.is_empty() {
            problems.push(format!(
                "{service}: granted but not called by non-test code: {extra:?}"
            ));
        }
        if want.is_empty() {
            problems.push(format!(
                "{service}: no call found in src/ (is the scan broken?)"
            ));
        }
    }

    let logs: BTreeSet<&str> = granted
        .iter()
        .map(String::as_str)
        .filter(|a| a.starts_with("logs:"))
        .collect();
    let logs_wanted: BTreeSet<&str> = LOGS_ACTIONS.iter().copied().collect();
    if logs != logs_wanted {
        problems.push(format!(
            "logs: missing {:?}, extra {:?} (exactly {LOGS_ACTIONS:?})",
            logs_wanted.difference(&logs).collect::<Vec<_>>(),
            logs.difference(&logs_wanted).collect::<Vec<_>>()
        ));
    }

    let others: Vec<&String> = granted
        .iter()
        .filter(|a| {
            !["dynamodb:", "secretsmanager:", "sqs:", "logs:"]
                .iter()
                .any(|p| a.starts_with(p))
        })
        .collect();
    if !others.is_empty() {
        problems.push(format!(
            "actions of other services granted to the function: {others:?}"
        ));
    }

    assert!(
        problems.is_empty(),
        "infra/template.yaml's function policy does not match the code:\n  - {}\n\
         granted: {granted:?}\ncalled: {called:?}",
        problems.join("\n  - ")
    );
}

#[test]
fn test_only_functions_are_not_called_by_deployed_code() {
    let sources = stripped_sources(&root());
    for (file, function, why) in TEST_ONLY_FUNCTIONS {
        assert!(
            sources.iter().any(|(path, _)| path.ends_with(file)),
            "{file} is gone: update TEST_ONLY_FUNCTIONS"
        );
        let callers: Vec<String> = sources
            .iter()
            .filter(|(_, code)| find_ident(code, function).is_some())
            .map(|(path, _)| path.display().to_string())
            .collect();
        assert!(
            callers.is_empty(),
            "{function} is excluded from the IAM check ({why}), but non-test code in \
             {callers:?} uses it: grant its actions and remove it from TEST_ONLY_FUNCTIONS"
        );
    }
}

/// Fan-out: the SQS actions are granted on the work queue only; the event source mapping
/// reports batch item failures and caps its concurrency by a parameter; the queue's
/// visibility timeout is at least six function timeouts (AWS's advice for event source
/// mappings) for every timeout the template allows; poison messages go to a dead-letter
/// queue that has an alarm.
#[test]
fn fan_out_is_scoped_to_the_work_queue_and_retries_into_a_dead_letter_queue() {
    let text = template();
    let lines = lines(&text);
    let role = block_text(&lines, resource(&lines, "FunctionRole"));
    let queue_policy = &role[role
        .find("PolicyName: work-queue")
        .expect("work-queue policy")..];
    for sid in ["DispatchToWorkQueue", "WorkFromWorkQueue"] {
        let statement = &queue_policy[queue_policy.find(sid).expect(sid)..];
        let resource_line = statement
            .lines()
            .find(|l| l.trim_start().starts_with("Resource:"))
            .expect("a Resource");
        assert_eq!(
            resource_line.trim(),
            "Resource: !GetAtt WorkQueue.Arn",
            "{sid} is scoped to the work queue"
        );
    }
    let mapping = block_text(&lines, resource(&lines, "WorkEventSourceMapping"));
    assert!(
        mapping.contains("EventSourceArn: !GetAtt WorkQueue.Arn"),
        "{mapping}"
    );
    assert!(
        mapping.contains("FunctionResponseTypes: [ReportBatchItemFailures]"),
        "{mapping}"
    );
    assert!(
        mapping.contains("MaximumConcurrency: !Ref MaxConcurrentWorkers"),
        "{mapping}"
    );
    let queue = block_text(&lines, resource(&lines, "WorkQueue"));
    let key = |block: &str, key: &str| -> Option<String> {
        block
            .lines()
            .find_map(|l| value_of(l, key).map(str::to_string))
    };
    let visibility: u64 = key(&queue, "VisibilityTimeout")
        .expect("VisibilityTimeout")
        .parse()
        .unwrap();
    let timeout = block_text(&lines, {
        let params = lines
            .iter()
            .position(|l| l.text.trim_end() == "Parameters:" && l.indent == 0)
            .expect("Parameters");
        children(&lines, params)
            .into_iter()
            .find(|&i| lines[i].text.trim() == "Timeout:")
            .expect("the Timeout parameter")
    });
    let max_timeout: u64 = key(&timeout, "MaxValue")
        .expect("Timeout's MaxValue")
        .parse()
        .unwrap();
    assert!(
        visibility >= 6 * max_timeout,
        "visibility {visibility} s < 6 x {max_timeout} s"
    );
    assert!(queue.contains("deadLetterTargetArn: !GetAtt WorkDeadLetterQueue.Arn"));
    let max_receive: u64 = key(&queue, "maxReceiveCount")
        .expect("maxReceiveCount")
        .parse()
        .unwrap();
    // A message must outlive its receives, or a failing one expires before it reaches the
    // dead-letter queue. Each receive ends at worst after the visibility timeout (a killed
    // run); a run that could not start comes back sooner (the retry delay), and the
    // dead-letter queue keeps what it gets longer than the queue did.
    let retention: u64 = key(&queue, "MessageRetentionPeriod")
        .expect("the queue's MessageRetentionPeriod")
        .parse()
        .unwrap();
    assert!(
        retention >= max_receive * visibility + 600,
        "retention {retention} s < {max_receive} receives x {visibility} s + 10 min"
    );
    let retry_delay = knowbe4_source::fanout::queue::RETRY_DELAY_SECS as u64;
    assert!(retry_delay < visibility && max_receive * retry_delay < retention);
    let dlq = block_text(&lines, resource(&lines, "WorkDeadLetterQueue"));
    let dlq_retention: u64 = key(&dlq, "MessageRetentionPeriod")
        .expect("the dead-letter queue's MessageRetentionPeriod")
        .parse()
        .unwrap();
    assert!(
        dlq_retention > retention,
        "the dead-letter queue keeps messages longer ({dlq_retention} s) than the queue ({retention} s)"
    );
    let alarm = block_text(&lines, resource(&lines, "WorkDeadLetterAlarm"));
    assert!(
        alarm.contains("!GetAtt WorkDeadLetterQueue.QueueName"),
        "{alarm}"
    );
    let function = block_text(&lines, resource(&lines, "Function"));
    assert!(function.contains("WORK_QUEUE_URL: !If [FanOut, !Ref WorkQueue, !Ref AWS::NoValue]"));
}

/// Review item 9: the change table is granted exactly the actions of the code that uses
/// it (src/store/dynamo/changes.rs, and the shared helpers it hands that table to), on
/// that table alone; it is kept like the state table; the function is told its name.
#[test]
fn the_change_table_is_granted_exactly_what_its_code_calls() {
    let sources = stripped_sources(&root());
    for (path, code) in &sources {
        let names_it = code.contains("self.change_table");
        assert_eq!(
            names_it,
            path == Path::new(CHANGE_TABLE_FILE),
            "{}: only {CHANGE_TABLE_FILE} may use the change table",
            path.display()
        );
    }
    let (_, changes) = sources
        .iter()
        .find(|(path, _)| path == Path::new(CHANGE_TABLE_FILE))
        .expect("the change table's file");
    assert!(
        !changes.contains("self.table"),
        "{CHANGE_TABLE_FILE} must not call on the state table (its fence checks are built in dynamo.rs)"
    );
    let mut called = sdk_actions_in_code(Path::new(CHANGE_TABLE_FILE), changes);
    // Helpers of dynamo.rs it passes the change table to: `self.helper(&self.change_table`.
    let (_, dynamo) = sources
        .iter()
        .find(|(path, _)| path == Path::new("src/store/dynamo.rs"))
        .expect("src/store/dynamo.rs");
    for (at, _) in changes.match_indices("(&self.change_table") {
        let name: String = changes[..at]
            .chars()
            .rev()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        // `self.helper(` possibly split over lines by rustfmt (`self\n    .helper(`).
        let from = (0..=at.saturating_sub(200))
            .rev()
            .find(|i| changes.is_char_boundary(*i))
            .unwrap_or(0);
        let before: String = changes[from..at]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if !before.ends_with(&format!("self.{name}")) {
            // An SDK builder's argument (`.table_name(&self.change_table)`).
            continue;
        }
        let body = function_text(dynamo, &name).unwrap_or_else(|| {
            panic!("{CHANGE_TABLE_FILE} passes the change table to {name}, not a fn of dynamo.rs")
        });
        called.extend(sdk_actions_in_code(
            Path::new("src/store/dynamo.rs"),
            &format!("use aws_sdk_dynamodb;\n{body}"),
        ));
    }
    assert!(!called.is_empty(), "no call found in {CHANGE_TABLE_FILE}");

    let text = template();
    let lines = lines(&text);
    let role = resource(&lines, "FunctionRole");
    let statements: Vec<usize> = (role..block_end(&lines, role))
        .filter(|&i| {
            block_text(&lines, i).contains("ChangeTable") && lines[i].text.starts_with("- Sid:")
        })
        .collect();
    assert_eq!(statements.len(), 1, "one statement names ChangeTable");
    let statement = statements[0];
    assert_eq!(lines[statement].text, "- Sid: ChangeTableItems");
    let granted: BTreeSet<String> = actions_in(&lines, statement).into_iter().collect();
    assert_eq!(
        granted, called,
        "ChangeTableItems vs the change table's calls"
    );
    let body = block_text(&lines, statement);
    let resource_line = body
        .lines()
        .find(|l| l.trim_start().starts_with("Resource:"))
        .expect("a Resource");
    assert_eq!(resource_line.trim(), "Resource: !GetAtt ChangeTable.Arn");

    // Kept, encrypted, recoverable and protected like the state table.
    let state = block_text(&lines, resource(&lines, "StateTable"));
    let change = block_text(&lines, resource(&lines, "ChangeTable"));
    for setting in [
        "DeletionPolicy: Retain",
        "UpdateReplacePolicy: Retain",
        "BillingMode: PAY_PER_REQUEST",
        "PointInTimeRecoveryEnabled: true",
        "DeletionProtectionEnabled: !If [DeletionProtection, true, false]",
        "SSEEnabled: true",
    ] {
        assert!(state.contains(setting), "StateTable: {setting}");
        assert!(change.contains(setting), "ChangeTable: {setting}");
    }
    let function = block_text(&lines, resource(&lines, "Function"));
    assert!(
        function.contains("CHANGE_TABLE: !Ref ChangeTable"),
        "{function}"
    );
}

/// The text of `fn name` (signature and body) in `code`.
fn function_text(code: &str, name: &str) -> Option<String> {
    let at = code
        .match_indices("fn ")
        .map(|(i, _)| i)
        .find(|&i| find_ident(&code[i + 3..], name) == Some(0))?;
    let open = at + code[at..].find('{')?;
    Some(code[at..=matching_brace(code, open)].to_string())
}

/// The template's text and its meaningful lines.
fn template() -> String {
    std::fs::read_to_string(root().join("infra/template.yaml")).expect("infra/template.yaml")
}

/// The lines of the block at `lines[at]` (itself included), joined.
fn block_text(lines: &[Line<'_>], at: usize) -> String {
    lines[at..block_end(lines, at)]
        .iter()
        .map(|l| l.text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The line index of resource `id`.
fn resource(lines: &[Line<'_>], id: &str) -> usize {
    resources(lines)
        .into_iter()
        .find(|(name, _)| name == id)
        .unwrap_or_else(|| panic!("no resource {id}"))
        .1
}

/// Issue 10, finding 5: per-source secrets live under `<stack>/sources/`, in the
/// environment and in the policy alike, where neither the stack's own secrets nor another
/// stack's can be.
#[test]
fn source_secrets_are_scoped_to_the_stacks_own_prefix() {
    let template = template();
    let lines = lines(&template);
    let function = resource(&lines, "Function");
    let variables = child(
        &lines,
        property(&lines, function, "Environment").unwrap(),
        "Variables",
    )
    .expect("Environment.Variables");
    let prefix_line = child(&lines, variables, "SECRET_PREFIX").expect("SECRET_PREFIX");
    let prefix = value_of(lines[prefix_line].text, "SECRET_PREFIX").unwrap();
    assert_eq!(prefix, "!Sub ${AWS::StackName}/sources/", "SECRET_PREFIX");

    let role = resource(&lines, "FunctionRole");
    let policies = block_text(&lines, role);
    let statement = policies
        .split("- Sid: ")
        .find(|s| s.starts_with("SourceSecrets"))
        .expect("a SourceSecrets statement");
    let arn = statement
        .lines()
        .find_map(|l| value_of(l, "Resource"))
        .expect("its Resource");
    assert!(
        arn.ends_with(":secret:${AWS::StackName}/sources/*"),
        "SourceSecrets must be scoped to SECRET_PREFIX: {arn}"
    );
    for own in ["ForwardUrlSecret", "ForwardTokenSecret"] {
        let at = resource(&lines, own);
        let name = value_of(lines[property(&lines, at, "Name").unwrap()].text, "Name").unwrap();
        let name = name.trim_start_matches("!Sub ");
        assert!(
            !name.starts_with("${AWS::StackName}/sources/"),
            "{own} ({name}) is inside the per-source prefix"
        );
    }
    // A source id cannot reach outside the prefix: ids are letters, digits, '-' and '_'.
    assert!(!statement.contains("knowbe4-source/*"), "{statement}");
}

/// Issue 10, finding 11: the Scheduler role can be assumed only for this stack's
/// schedule (`aws:SourceArn`), not by any schedule of the account.
#[test]
fn the_schedule_role_trusts_only_this_stacks_schedule() {
    let template = template();
    let lines = lines(&template);
    let schedule = resource(&lines, "Schedule");
    let name = value_of(
        lines[property(&lines, schedule, "Name").expect("a named schedule")].text,
        "Name",
    )
    .unwrap()
    .trim_start_matches("!Sub ")
    .to_string();
    let role = resource(&lines, "ScheduleRole");
    let trust = block_text(
        &lines,
        property(&lines, role, "AssumeRolePolicyDocument").unwrap(),
    );
    let source_arn = trust
        .lines()
        .find_map(|l| value_of(l, "aws:SourceArn"))
        .expect("an aws:SourceArn condition in the ScheduleRole trust policy");
    assert_eq!(
        source_arn,
        format!(
            "!Sub arn:${{AWS::Partition}}:scheduler:${{AWS::Region}}:${{AWS::AccountId}}:schedule/default/{name}"
        )
    );
    assert!(trust.contains("aws:SourceAccount"), "{trust}");
    // The role's one permission is invoking this function.
    let policies = block_text(&lines, property(&lines, role, "Policies").unwrap());
    assert!(
        policies.contains("Action: lambda:InvokeFunction"),
        "{policies}"
    );
    assert!(
        policies.contains("Resource: !GetAtt Function.Arn"),
        "{policies}"
    );
}

/// Issue 10, finding 6 (the template's half): no `LogLevel` the template allows is
/// `TRACE`, at which the Lambda runtime logs raw payloads.
#[test]
fn the_template_allows_no_trace_log_level() {
    let template = template();
    let allowed = log_levels_allowed(&template);
    assert!(allowed.contains(&"DEBUG".to_string()), "{allowed:?}");
    assert!(
        !allowed.iter().any(|l| l.eq_ignore_ascii_case("TRACE")),
        "{allowed:?}"
    );
}

/// The `AllowedValues` of the `LogLevel` parameter.
fn log_levels_allowed(template: &str) -> Vec<String> {
    let lines = lines(template);
    let parameters = lines
        .iter()
        .position(|l| l.indent == 0 && value_of(l.text, "Parameters").is_some())
        .expect("Parameters");
    let level = child(&lines, parameters, "LogLevel").expect("a LogLevel parameter");
    let values = child(&lines, level, "AllowedValues").expect("LogLevel.AllowedValues");
    value_of(lines[values].text, "AllowedValues")
        .unwrap()
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|v| v.trim().to_string())
        .collect()
}

// ------------------------------------------------------------------ the template side

/// A line of the template without its comment, with its indentation.
struct Line<'a> {
    /// 1-based line number (for messages).
    number: usize,
    /// Leading spaces.
    indent: usize,
    /// The content after the indentation, comment removed, right-trimmed.
    text: &'a str,
}

/// The meaningful lines (no blank or comment-only lines).
fn lines(template: &str) -> Vec<Line<'_>> {
    template
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let text = strip_yaml_comment(raw).trim_end();
            let content = text.trim_start();
            if content.is_empty() {
                return None;
            }
            Some(Line {
                number: i + 1,
                indent: text.len() - content.len(),
                text: content,
            })
        })
        .collect()
}

/// Removes a `# comment` (a `#` at the start or after a space, outside quotes).
fn strip_yaml_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous == ' ' || previous == '\t' => return &line[..i],
            _ => {}
        }
        previous = c;
    }
    line
}

/// The index after the block that starts at `lines[start]` (the following lines indented
/// more than it).
fn block_end(lines: &[Line<'_>], start: usize) -> usize {
    let indent = lines[start].indent;
    lines[start + 1..]
        .iter()
        .position(|l| l.indent <= indent)
        .map_or(lines.len(), |p| start + 1 + p)
}

/// The indices of the direct children of the block at `lines[start]`.
fn children(lines: &[Line<'_>], start: usize) -> Vec<usize> {
    let end = block_end(lines, start);
    let Some(first) = lines.get(start + 1).filter(|_| start + 1 < end) else {
        return Vec::new();
    };
    (start + 1..end)
        .filter(|&i| lines[i].indent == first.indent)
        .collect()
}

/// The value of `key: value` on a line (`None` if the line is not that key).
fn value_of<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let text = text.strip_prefix("- ").unwrap_or(text).trim_start();
    for quoted in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
        if let Some(rest) = text.strip_prefix(&quoted)
            && let Some(value) = rest.trim_start().strip_prefix(':')
            && (value.is_empty() || value.starts_with(' '))
        {
            return Some(value.trim());
        }
    }
    None
}

/// The resources: logical id and the index of its line.
fn resources(lines: &[Line<'_>]) -> Vec<(String, usize)> {
    let start = lines
        .iter()
        .position(|l| l.indent == 0 && value_of(l.text, "Resources").is_some())
        .expect("infra/template.yaml has a Resources section");
    children(lines, start)
        .into_iter()
        .filter_map(|i| {
            let id = lines[i].text.strip_suffix(':')?;
            Some((id.trim_matches('"').to_string(), i))
        })
        .collect()
}

/// The child `key:` of the block at `lines[at]`.
fn child(lines: &[Line<'_>], at: usize, key: &str) -> Option<usize> {
    children(lines, at)
        .into_iter()
        .find(|&i| value_of(lines[i].text, key).is_some())
}

/// The `Type:` of the resource at `lines[at]`.
fn resource_type(lines: &[Line<'_>], at: usize) -> Option<String> {
    let i = child(lines, at, "Type")?;
    value_of(lines[i].text, "Type").map(|t| t.trim_matches(|c| c == '"' || c == '\'').to_string())
}

/// A property's line index inside the resource at `lines[at]` (under `Properties:`).
fn property(lines: &[Line<'_>], at: usize, name: &str) -> Option<usize> {
    child(lines, child(lines, at, "Properties")?, name)
}

/// Every action under the function's `Policies:` and under those of the role it names.
fn function_policy_actions(template: &str) -> BTreeSet<String> {
    let lines = lines(template);
    let resources = resources(&lines);
    let functions: Vec<&(String, usize)> = resources
        .iter()
        .filter(|(_, at)| {
            resource_type(&lines, *at).as_deref() == Some("AWS::Serverless::Function")
        })
        .collect();
    assert_eq!(
        functions.len(),
        1,
        "expected one AWS::Serverless::Function in infra/template.yaml, found {:?}",
        functions.iter().map(|(id, _)| id).collect::<Vec<_>>()
    );
    let (function, function_at) = functions[0];

    let mut policy_holders = vec![*function_at];
    if let Some(role_at) = property(&lines, *function_at, "Role") {
        let value = value_of(lines[role_at].text, "Role").unwrap_or_default();
        let role = value
            .strip_prefix("!GetAtt ")
            .and_then(|v| v.trim().strip_suffix(".Arn"))
            .unwrap_or_else(|| {
                panic!(
                    "line {}: {function}'s Role must be `!GetAtt <RoleInThisTemplate>.Arn` \
                     so its policy can be checked, found {value:?}",
                    lines[role_at].number
                )
            });
        let (_, role_at) = resources
            .iter()
            .find(|(id, _)| id == role)
            .unwrap_or_else(|| panic!("role {role} is not a resource of the template"));
        assert_eq!(
            resource_type(&lines, *role_at).as_deref(),
            Some("AWS::IAM::Role"),
            "{role} is not an AWS::IAM::Role"
        );
        policy_holders.push(*role_at);
    }

    let mut actions = BTreeSet::new();
    let mut found_policies = false;
    for at in policy_holders {
        let Some(policies_at) = property(&lines, at, "Policies") else {
            continue;
        };
        found_policies = true;
        actions.extend(actions_in(&lines, policies_at));
    }
    assert!(
        found_policies,
        "{function} has no Policies (on itself or on its role): nothing to check"
    );
    actions
}

/// Every `Action:` value inside the block starting at `lines[start]`.
fn actions_in(lines: &[Line<'_>], start: usize) -> Vec<String> {
    let body = &lines[start + 1..block_end(lines, start)];
    let mut actions = Vec::new();
    for (i, line) in body.iter().enumerate() {
        assert!(
            value_of(line.text, "NotAction").is_none(),
            "line {}: NotAction cannot be checked; list the actions",
            line.number
        );
        let Some(value) = value_of(line.text, "Action") else {
            continue;
        };
        let key_indent = line.indent + if line.text.starts_with("- ") { 2 } else { 0 };
        let items: Vec<(usize, String)> = if value.is_empty() {
            // A block list: `- item` lines at or below the key's indentation.
            body[i + 1..]
                .iter()
                .take_while(|l| l.indent >= key_indent && l.text.starts_with("- "))
                .filter(|l| l.indent >= key_indent)
                .map(|l| (l.number, l.text[2..].trim().to_string()))
                .collect()
        } else if let Some(flow) = value.strip_prefix('[') {
            let flow = flow
                .strip_suffix(']')
                .unwrap_or_else(|| panic!("line {}: a flow list on one line", line.number));
            flow.split(',')
                .map(|s| (line.number, s.trim().to_string()))
                .filter(|(_, s)| !s.is_empty())
                .collect()
        } else {
            vec![(line.number, value.to_string())]
        };
        assert!(!items.is_empty(), "line {}: an empty Action", line.number);
        for (number, item) in items {
            let item = item.trim_matches(|c| c == '"' || c == '\'');
            assert!(
                !item.starts_with('!') && !item.contains("${") && !item.contains('*'),
                "line {number}: action {item:?} is computed or a wildcard; list it literally"
            );
            assert!(
                item.contains(':'),
                "line {number}: {item:?} is not service:Action"
            );
            actions.push(item.to_string());
        }
    }
    actions
}

// ------------------------------------------------------------------ the code side

/// Every `src/**/*.rs` file (minus files that are `#[cfg(test)] mod x;`), with comments,
/// literals, `#[cfg(test)]` items and [`TEST_ONLY_FUNCTIONS`] blanked out.
fn stripped_sources(root: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    collect_rs_files(&root.join("src"), &mut files);
    files.sort();
    let mut test_files = BTreeSet::new();
    let mut sources = Vec::new();
    for path in &files {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut code = blank_comments_and_literals(&text);
        for module in blank_cfg_test_items(&mut code) {
            test_files.extend(module_files(path, &module));
        }
        let relative = path.strip_prefix(root).unwrap_or(path);
        for (file, function, _) in TEST_ONLY_FUNCTIONS {
            if relative == Path::new(file) {
                assert!(
                    blank_function(&mut code, function),
                    "{file} has no fn {function}: update TEST_ONLY_FUNCTIONS"
                );
            }
        }
        sources.push((relative.to_path_buf(), code));
    }
    sources.retain(|(path, _)| !test_files.contains(&root.join(path)));
    sources
}

fn collect_rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect_rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Where `mod name;` declared in `file` lives.
fn module_files(file: &Path, name: &str) -> [PathBuf; 2] {
    let dir = file.parent().expect("a file in a directory");
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let base = if matches!(stem, "mod" | "lib" | "main") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    [
        base.join(format!("{name}.rs")),
        base.join(name).join("mod.rs"),
    ]
}

/// The AWS actions of every SDK call in non-test code.
fn sdk_actions_in(root: &Path) -> BTreeSet<String> {
    let mut actions = BTreeSet::new();
    for (path, code) in stripped_sources(root) {
        actions.extend(sdk_actions_in_code(&path, &code));
    }
    actions
}

/// The AWS actions of the SDK calls in one file's stripped `code`.
fn sdk_actions_in_code(path: &Path, code: &str) -> BTreeSet<String> {
    let mut actions = BTreeSet::new();
    {
        let uses_dynamodb = code.contains("aws_sdk_dynamodb");
        let uses_secrets = code.contains("aws_sdk_secretsmanager");
        let uses_sqs = code.contains("aws_sdk_sqs");
        for (name, position) in empty_calls(code) {
            let in_dynamodb = uses_dynamodb && DYNAMODB_OPERATIONS.contains(&name.as_str());
            let in_secrets = uses_secrets && SECRETSMANAGER_OPERATIONS.contains(&name.as_str());
            let in_sqs = uses_sqs && SQS_OPERATIONS.contains(&name.as_str());
            let line = code[..position].matches('\n').count() + 1;
            assert!(
                [in_dynamodb, in_secrets, in_sqs]
                    .iter()
                    .filter(|b| **b)
                    .count()
                    <= 1,
                "{}:{line}: .{name}() is an operation of both SDKs used in this file; \
                 split the file or teach this test which client it is",
                path.display()
            );
            if in_sqs {
                actions.insert(sqs_action(&name));
            } else if in_dynamodb {
                actions.extend(dynamodb_actions(&name, code, path, line));
            } else if in_secrets {
                actions.insert(format!("secretsmanager:{}", pascal_case(&name)));
                // Tags given on CreateSecret are authorised as TagResource too.
                if name == "create_secret" && code.contains(".tags(") {
                    actions.insert("secretsmanager:TagResource".to_string());
                }
            }
        }
    }
    actions
}

/// The IAM actions of one DynamoDB operation called in `code`.
fn dynamodb_actions(operation: &str, code: &str, path: &Path, line: usize) -> Vec<String> {
    match operation {
        "transact_write_items" => {
            let parts: Vec<String> = TRANSACT_WRITE_PARTS
                .iter()
                .filter(|(builder, _)| {
                    find_ident(code, builder)
                        .is_some_and(|_| contains_path_call(code, builder, "builder"))
                })
                .map(|(_, action)| action.to_string())
                .collect();
            assert!(
                !parts.is_empty(),
                "{}:{line}: TransactWriteItems without any Put/Update/Delete/ConditionCheck \
                 builder in the file",
                path.display()
            );
            parts
        }
        "transact_get_items"
        | "execute_statement"
        | "batch_execute_statement"
        | "execute_transaction" => panic!(
            "{}:{line}: .{operation}() is authorised by other actions than its name; \
             teach this test how",
            path.display()
        ),
        _ => vec![format!("dynamodb:{}", pascal_case(operation))],
    }
}

/// `get_secret_value` -> `GetSecretValue`.
fn pascal_case(snake: &str) -> String {
    snake
        .split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Method calls without arguments, `.name()` (whitespace and newlines allowed around the
/// dot and inside the parentheses): the name and its position.
fn empty_calls(code: &str) -> Vec<(String, usize)> {
    let bytes = code.as_bytes();
    let mut calls = Vec::new();
    for (dot, _) in code.match_indices('.') {
        let mut i = dot + 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        if start == i || bytes[start].is_ascii_digit() {
            continue;
        }
        let name = &code[start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if bytes.get(i) != Some(&b'(') {
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if bytes.get(i) == Some(&b')') {
            calls.push((name.to_string(), start));
        }
    }
    calls
}

/// The position of `ident` as a whole identifier in `code`.
fn find_ident(code: &str, ident: &str) -> Option<usize> {
    let bytes = code.as_bytes();
    code.match_indices(ident).map(|(i, _)| i).find(|&i| {
        let before = i.checked_sub(1).map(|b| bytes[b]);
        let after = bytes.get(i + ident.len()).copied();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// Whether `code` calls `Type::function(` with `Type` a whole identifier.
fn contains_path_call(code: &str, type_name: &str, function: &str) -> bool {
    let bytes = code.as_bytes();
    let needle = format!("{type_name}::{function}(");
    code.match_indices(&needle)
        .any(|(i, _)| !i.checked_sub(1).is_some_and(|b| is_ident(bytes[b])))
}

/// Replaces comments and string, byte-string and char literals with spaces (newlines
/// kept), so braces and names inside them do not count.
fn blank_comments_and_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let prev_is_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if !prev_is_ident && raw_string_start(&chars, i).is_some() {
            let (hashes, open) = raw_string_start(&chars, i).expect("checked");
            let mut j = open + 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (1..=hashes).all(|h| chars.get(j + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.extend(chars[i..j.min(chars.len())].iter().map(|&c| blank(c)));
            i = j;
        } else if c == '"' || (c == 'b' && next == Some('"') && !prev_is_ident) {
            let mut j = if c == 'b' { i + 2 } else { i + 1 };
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(chars.len());
            out.extend(chars[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{7f}'), or a lifetime ('a, '_), left as is.
            let end = if next == Some('\\') {
                (i + 2..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .map(|j| j + 1)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    out.extend(chars[i..end].iter().map(|&c| blank(c)));
                    i = end;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// `r"`, `r#"`, `br##"`... at `i`: the number of hashes and the index of the quote.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    (chars.get(j + hashes) == Some(&'"')).then_some((hashes, j + hashes))
}

/// The index of the brace closing the one at `open`.
fn matching_brace(code: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, b) in code.bytes().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces after byte {open}")
}

/// Blanks `code[start..=end]` (newlines kept).
fn blank_range(code: &mut String, start: usize, end: usize) {
    let blanked: String = code[start..=end]
        .chars()
        .map(|c| if c == '\n' { '\n' } else { ' ' })
        .collect();
    code.replace_range(start..=end, &blanked);
}

/// Blanks every `#[cfg(test)]` item with a body; returns the names of `#[cfg(test)]
/// mod name;` declarations (their files are test code).
fn blank_cfg_test_items(code: &mut String) -> Vec<String> {
    let mut modules = Vec::new();
    while let Some(attr) = code.find("#[cfg(test)]") {
        let after = attr + "#[cfg(test)]".len();
        let rest = &code[after..];
        let semicolon = rest.find(';').map(|i| after + i);
        let brace = rest.find('{').map(|i| after + i);
        match (semicolon, brace) {
            (Some(semi), b) if b.is_none_or(|b| semi < b) => {
                let item = code[after..semi].trim();
                let name = item
                    .rsplit_once("mod ")
                    .map(|(_, name)| name.trim().to_string())
                    .unwrap_or_else(|| panic!("#[cfg(test)] {item}; is not a module"));
                modules.push(name);
                blank_range(code, attr, semi);
            }
            (_, Some(open)) => {
                let close = matching_brace(code, open);
                blank_range(code, attr, close);
            }
            _ => panic!("#[cfg(test)] without an item"),
        }
    }
    modules
}

/// Blanks `fn name` (signature and body); false when there is none.
fn blank_function(code: &mut String, name: &str) -> bool {
    let Some(at) = code
        .match_indices("fn ")
        .map(|(i, _)| i)
        .find(|&i| find_ident(&code[i + 3..], name) == Some(0))
    else {
        return false;
    };
    let open = at + code[at..].find('{').expect("a function body");
    let close = matching_brace(code, open);
    blank_range(code, at, close);
    true
}

// ------------------------------------------------------------------ the scanners' own tests

#[test]
fn the_template_scan_reads_every_action_form_and_ignores_other_resources() {
    let template = r#"
Resources:
  Role:
    Type: AWS::IAM::Role
    Properties:
      AssumeRolePolicyDocument:
        Statement:
          - Action: sts:AssumeRole   # not a permission of the function
      Policies:
        - PolicyName: a
          PolicyDocument:
            Statement:
              - Effect: Allow
                Action: "dynamodb:GetItem"
                Resource: !GetAtt Table.Arn
              - !If
                - Cond
                - Effect: Allow
                  Action: [secretsmanager:GetSecretValue, 'logs:PutLogEvents']
                  Resource: !Sub "arn:${AWS::Partition}:x"
                - !Ref AWS::NoValue
              - Effect: Allow
                Action:
                - dynamodb:Query
                - dynamodb:Scan # listing
                Resource: "*"
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      Role: !GetAtt Role.Arn
      Policies:
        - Statement:
            - Effect: Allow
              Action:
                - logs:CreateLogStream
  Other:
    Type: AWS::IAM::Role
    Properties:
      Policies:
        - PolicyDocument:
            Statement:
              - Action: s3:GetObject
"#;
    let actions: Vec<String> = function_policy_actions(template).into_iter().collect();
    assert_eq!(
        actions,
        [
            "dynamodb:GetItem",
            "dynamodb:Query",
            "dynamodb:Scan",
            "logs:CreateLogStream",
            "logs:PutLogEvents",
            "secretsmanager:GetSecretValue"
        ]
    );
}

#[test]
fn the_code_scan_skips_comments_literals_and_test_items() {
    let mut code = blank_comments_and_literals(
        r##"
use aws_sdk_dynamodb::Client;
// client.scan() in a comment
fn real(c: &Client) { let _ = c.get_item(); let _ = "{ .put_item() }"; let _ = '{'; }
fn setup(c: &Client) { c.create_table(); }
#[cfg(test)]
fn only_tests(c: &Client) -> impl Iterator<Item = u8> + '_ { c.delete_item(); }
#[cfg(test)]
mod tests { fn t(c: &Client) { c.scan(); let _ = r#"}"#; } }
#[cfg(test)]
mod more;
fn after(c: &Client) { c
    .query ( ) ; }
"##,
    );
    let modules = blank_cfg_test_items(&mut code);
    assert_eq!(modules, ["more"]);
    assert!(blank_function(&mut code, "setup"));
    let names: Vec<String> = empty_calls(&code).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["get_item", "query"]);
    assert_eq!(pascal_case("batch_write_item"), "BatchWriteItem");
    assert_eq!(
        module_files(Path::new("/x/src/sim/mod.rs"), "tests")[0],
        Path::new("/x/src/sim/tests.rs")
    );
}
